"""Server-side checks of every numeric and choice input: what the page sends, a script can send
with any value (Gradio checks nothing on ``preprocess=False`` events), so each handler checks
its inputs here and a bad one gets a message naming the input and its allowed values."""

from __future__ import annotations

import math
from collections.abc import Sequence

SEED_MAX = 2**32 - 1
MAX_TEXT = 2000  # characters of a typed text input (labels)


class InputError(ValueError):
    """A numeric or choice input outside what the control allows."""


def choice(value, options: Sequence[str], what: str) -> str:
    """``value`` when it is one of ``options``."""
    if not isinstance(value, str) or value not in options:
        shown = repr(value)[:40] if isinstance(value, str) else type(value).__name__
        raise InputError(f"{what} must be one of {', '.join(map(repr, options))}; got {shown}")
    return value


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:.4g}"


def number(value, lo: float, hi: float, what: str) -> float:
    """A finite number in ``[lo, hi]`` (int or float; not bool, not text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{what} must be a number from {_show(lo)} to {_show(hi)}")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x) or not lo <= x <= hi:
        shown = _show(x) if math.isfinite(x) else str(value)[:30]
        raise InputError(f"{what} must be from {_show(lo)} to {_show(hi)}; got {shown}")
    return x


def integer(value, lo: int, hi: int, what: str) -> int:
    """A whole number in ``[lo, hi]`` (floats such as 3.0 from sliders are accepted)."""
    x = number(value, lo, hi, what)
    if x != int(x):
        raise InputError(f"{what} must be a whole number from {lo} to {hi}; got {x:g}")
    return int(x)


def seed(value) -> int:
    """A seed from 0 to 2**32 - 1 (an empty box means 0)."""
    return 0 if value is None else integer(value, 0, SEED_MAX, "seed")


def flag(value, what: str) -> bool:
    """A checkbox value."""
    if not isinstance(value, bool):
        raise InputError(f"{what} must be true or false")
    return value


def text(value, what: str, max_chars: int = MAX_TEXT) -> str:
    """Typed text, at most ``max_chars`` characters."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be text")
    if len(value) > max_chars:
        raise InputError(f"{what} is {len(value)} characters long; the limit is {max_chars}")
    return value
