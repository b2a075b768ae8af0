"""Apply a salience vector to a large ``[m, n]`` float32 loss table a few rows at a time."""

from __future__ import annotations

import numpy as np

from .salience import SalienceVector

# SalienceVector.weighted_loss converts its input to float64; this many float64 bytes at a time keeps that
# conversion small next to a table of gigabytes.
_CHUNK_BYTES = 2**27


def weighted_losses(sv: SalienceVector, losses: np.ndarray, fingerprint: str | None = None) -> np.ndarray:
    """float64 ``[m]``: ``sv.weighted_loss`` of each row of ``losses`` ``[m, n]``, without a float64 copy of it."""
    rows = max(1, _CHUNK_BYTES // (8 * max(1, losses.shape[-1])))
    return np.concatenate([np.atleast_1d(sv.weighted_loss(losses[i : i + rows], fingerprint))
                           for i in range(0, len(losses), rows)])
