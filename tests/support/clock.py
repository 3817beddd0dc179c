"""Clocks for the fixed one-minute rate windows (shared/ratelimit.py).

In-process services take a `rate_clock` (the `rate_clock` fixture hands them a `ManualClock`), so a
rate test counts inside one window however long it runs and never waits for a minute boundary.
A real `protege-relay` process reads the wall clock: tests of processes wait until they are clear
of a boundary with the two helpers below (at most a few seconds, and only near a boundary).
"""

from __future__ import annotations

import time

from tests.support.wait import eventually, poll_until

WINDOW_S = 60.0


class ManualClock:
    """A rate clock that stands in the middle of a minute window until the test moves it."""

    def __init__(self, now_s: float | None = None) -> None:
        self.now_s = now_s if now_s is not None else (time.time() // WINDOW_S) * WINDOW_S + WINDOW_S / 2

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def _clear_of_boundary(margin_s: float) -> bool:
    return margin_s < time.time() % WINDOW_S < WINDOW_S - margin_s


def wait_clear_of_minute_boundary(margin_s: float = 5.0) -> None:
    """For tests of real processes (wall clock): start a rate test at least `margin_s` inside a window."""
    poll_until(lambda: _clear_of_boundary(margin_s), timeout_s=2 * margin_s + 1)


async def away_from_minute_boundary(margin_s: float = 5.0) -> None:
    """`wait_clear_of_minute_boundary` for async tests (does not block the test's event loop)."""
    await eventually(lambda: _clear_of_boundary(margin_s), timeout_s=2 * margin_s + 1)
