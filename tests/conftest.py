"""Server fixtures live in tests/fixtures/, written once and shared by every test;
event builders live in tests/factories.py. No test module imports another."""

from hypothesis import settings

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.s3",
    "tests.fixtures.pki",
    "tests.fixtures.browser",
    "tests.fixtures.otlp",
]

# Property tests check what the policy decides, not how fast: no per-example
# deadline (a loaded 2-core machine made one example exceed hypothesis' 200 ms
# default now and then, a failure that said nothing about the code).
settings.register_profile("switchyard", deadline=None)
settings.load_profile("switchyard")
