"""Input validation shared by the public entry points.

Every check raises ``ValueError`` with a message that says what was wrong and how to fix it: the brief
asks that bad input fails early and loudly, never by silent coercion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_FINITE_CHUNK = 2**20  # elements per chunk of require_finite's check


def as_float_array(x: Any, name: str, ndim: int | tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
    """Convert a tensor / array-like to a finite numpy array of ``ndim`` dimensions.

    Raises ValueError on a wrong number of dimensions, an empty array or any NaN/inf entry.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.float32).numpy()
    arr = np.asarray(x, dtype=dtype)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimension(s), got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one value.")
    require_finite(arr, name)
    return arr


def require_finite(arr: np.ndarray, name: str) -> None:
    """Raise ValueError naming the first non-finite entry of ``arr``."""
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
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf), the first at index {first}; "
            "drop or re-evaluate those checkpoints before fitting or predicting."
        )
