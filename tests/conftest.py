"""Server fixtures live in tests/fixtures/, written once and shared by every test."""

pytest_plugins = ["tests.fixtures.servers", "tests.fixtures.s3", "tests.fixtures.pki"]
