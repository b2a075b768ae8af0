"""Input validation shared by the public entry points.

Every check raises ``ValueError`` with a message that says what was wrong and how to fix it: the brief
asks that bad input fails early and loudly, never by silent coercion.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

import numpy as np
import torch

_FINITE_CHUNK = 2**20  # elements per chunk of require_finite's check
_CHECKPOINT_FIX = "drop or re-evaluate those checkpoints before fitting or predicting"


def as_float_array(
    x: Any, name: str, ndim: int | tuple[int, ...], dtype: type = np.float64, fix: str = _CHECKPOINT_FIX
) -> np.ndarray:
    """Convert a tensor / array-like to a finite numpy array of ``ndim`` dimensions.

    Raises ValueError on a wrong number of dimensions, an empty array or any NaN/inf entry; ``fix`` is the
    advice given for a non-finite entry (see :func:`require_finite`).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.float32).numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:  # e.g. strings, or ragged rows
        raise ValueError(f"{name} must be an array of numbers ({e}).") from None
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimension(s), got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one value.")
    require_finite(arr, name, fix)
    return arr


def require_finite(arr: np.ndarray, name: str, fix: str = _CHECKPOINT_FIX) -> None:
    """Raise ValueError naming the first non-finite entry of ``arr``.

    ``fix`` completes the message with what the caller should do; the default suits losses and scores of
    checkpoints, the usual input.
    """
    # Rows are checked in bounded chunks first: a whole-array check of a multi-GB loss matrix makes two bool
    # temporaries of a quarter of its size each, which was the peak memory of `csv-callback fit`.
    if arr.ndim >= 2 and arr.size > _FINITE_CHUNK:
        rows = max(1, _FINITE_CHUNK // (arr.size // arr.shape[0]))
        if all(np.isfinite(arr[a : a + rows]).all() for a in range(0, arr.shape[0], rows)):
            return
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf), the first at index {first}; {fix}."
        )


def as_float_tuple(value: Any, name: str, n: int, form: str) -> tuple[float, ...]:
    """``value`` as a tuple of ``n`` floats (NaN/inf allowed: callers decide); ``form`` describes what is expected,
    e.g. ``"a (loss, score) pair of numbers, e.g. (0.0, 1.0)"``."""
    # A str is iterable: "01" would pass as the pair (0.0, 1.0).
    if not isinstance(value, (str, bytes)):
        try:
            out = tuple(float(v) for v in value)
        except (TypeError, ValueError):  # not iterable, or an item that is not a number
            out = ()
        if len(out) == n:
            return out
    raise ValueError(f"{name} must be {form}, got {value!r}.")


def require_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; floats (even 2.0) and bools are refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def require_str(value: Any, name: str, allow_empty: bool = False) -> str:
    """``value`` if it is a str (non-empty unless ``allow_empty``)."""
    if not isinstance(value, str) or not (value or allow_empty):
        kind = "a str" if allow_empty else "a non-empty str"
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    return value


def is_integer_tensor(t: torch.Tensor) -> bool:
    """True for a tensor of an integer dtype. Bool is not one (True would silently index 1), nor is a float
    dtype (0.7 would silently become 0)."""
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def parse_json(text: str | bytes, what: str) -> Any:
    """``json.loads(text)``; JSON nested too deeply for Python's parser (a RecursionError, about 1000 levels)
    raises ValueError about ``what`` instead, as malformed JSON (a ``JSONDecodeError``) does."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is JSON nested too deeply for Python to parse") from None


def require_json_depth(obj: Any, name: str, limit: int) -> None:
    """Raise ValueError unless ``obj`` (parsed JSON) nests dicts and lists at most ``limit`` levels deep.

    The walk is iterative, so a deep ``obj`` cannot raise RecursionError here; the callers' later recursive
    walks (``json.dumps``, reports) are what the limit protects.
    """
    stack = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth >= limit:
                raise ValueError(f"{name} nests objects and lists more than {limit} levels deep")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
