"""Shared argument checks: one place that says what a valid number or choice is.

Every public constructor validates its arguments once with these helpers, so a bad
value fails at the call that passed it, with a message naming the argument, what it got
and what to pass instead. ``bool`` is never accepted as a number (``True`` is an ``int``
to Python, but ``lam=True`` is always a mistake). Every check raises ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["check_real", "check_int", "check_choice", "check_bool"]


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_real(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False,
               open_unit: bool = False, normal: bool = False) -> float:
    """A finite real number (not a bool), returned as ``float``.

    Args:
        name: the argument's name, for the message.
        value: what was passed.
        positive: require ``value > 0``.
        nonnegative: require ``value >= 0``.
        open_unit: require ``0 < value < 1``.
        normal: require a normal float (not denormal): a denormal divides to inf.

    Raises:
        ValueError: not a real number, a bool, NaN, infinite or out of range.

    Example:
        >>> check_real("lam", 1e-2, positive=True)
        0.01
        >>> check_real("lam", True, positive=True)
        Traceback (most recent call last):
        ...
        ValueError: lam must be a finite number > 0, got True (bool)
    """
    what = "in (0, 1)" if open_unit else "a finite number > 0" if positive else \
        "a finite number >= 0" if nonnegative else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {what}, got {_describe(value)}")
    out = float(value)
    if not math.isfinite(out) or (positive and not out > 0) or (
            nonnegative and not out >= 0) or (open_unit and not 0.0 < out < 1.0):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if normal and out != 0 and abs(out) < 2.2250738585072014e-308:
        raise ValueError(f"{name}={value!r} is a denormal float (below 2.2e-308): GNQ would "
                         f"divide by it and overflow to inf; pass a value >= 1e-300")
    return out


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """An integer (not a bool, not a float with a fraction, not NaN), returned as ``int``.

    Example:
        >>> check_int("log_every", 10, minimum=1)
        10
        >>> check_int("log_every", 2.5)
        Traceback (most recent call last):
        ...
        ValueError: log_every must be an integer, got 2.5 (float)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {_describe(value)}")
    out = int(value)
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of ``choices``.

    Example:
        >>> check_choice("on_nonfinite", "skip", ("raise", "skip"))
        'skip'
    """
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        names = [repr(c) for c in choices]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{name} must be {listed}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """A real ``bool`` (``0``/``1`` are rejected: a flag is not a count).

    Example:
        >>> check_bool("relative_lam", False)
        False
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {_describe(value)}")
    return value
