"""The one way tests wait for something asynchronous: poll a condition until a deadline.

A state read once right after an asynchronous step (a socket closed, a job finished, a reply
sent) races with the step's remaining work; poll it instead. Never sleep to synchronise.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar, overload

T = TypeVar("T")

POLL_INTERVAL_S = 0.02

# What a predicate returns while the condition does not hold yet; only truthy values are returned,
# so `next(..., None)` or `ready and value` predicates give their value's type.
Falsy = None | Literal[False]


def poll_until(
    predicate: Callable[[], T | Falsy],
    timeout_s: float = 15.0,
    interval_s: float = POLL_INTERVAL_S,
    message: str | Callable[[], str] = "",
) -> T:
    """Call `predicate` until it returns a truthy value (returned); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_failure(message, timeout_s, value))
        time.sleep(interval_s)


@overload
async def eventually(
    predicate: Callable[[], Awaitable[T | Falsy]],
    timeout_s: float = ...,
    message: str | Callable[[], str] = ...,
    interval_s: float = ...,
) -> T: ...


@overload
async def eventually(
    predicate: Callable[[], T | Falsy],
    timeout_s: float = ...,
    message: str | Callable[[], str] = ...,
    interval_s: float = ...,
) -> T: ...


async def eventually(
    predicate: Callable[[], Any],
    timeout_s: float = 15.0,
    message: str | Callable[[], str] = "",
    interval_s: float = POLL_INTERVAL_S,
) -> Any:
    """Async `poll_until`: the event loop (an in-process service) keeps running while we wait.
    `predicate` may be a plain function or return an awaitable (a coroutine reading Redis)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value: Any = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(_failure(message, timeout_s, value))
        await asyncio.sleep(interval_s)


def _failure(message: str | Callable[[], str], timeout_s: float, value: object) -> str:
    """The assertion text: `message` (called if it is a function, so it can show the state at the
    deadline), else the timeout and the predicate's last value."""
    text = message() if callable(message) else message
    return text or f"condition not met within {timeout_s}s (last value {value!r})"


__all__ = ["eventually", "poll_until"]
