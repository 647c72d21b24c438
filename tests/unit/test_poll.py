"""fixtures.util.poll: the async tests' only wait, so it must return what it saw and fail on time."""

from __future__ import annotations

import pytest

from tests.fixtures.util import poll


async def test_poll_returns_the_first_truthy_value_and_keeps_going_past_errors():
    calls = 0

    async def third_time() -> int | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("not yet")
        return calls if calls >= 3 else None

    assert await poll(third_time, timeout=5, interval=0.001) == 3


async def test_poll_fails_after_its_deadline_naming_the_condition_and_the_last_error():
    async def never() -> None:
        raise ConnectionError("refused")

    with pytest.raises(TimeoutError, match=r"the thing not met within 0.05s .*refused"):
        await poll(never, timeout=0.05, interval=0.01, what="the thing")
