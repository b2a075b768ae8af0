"""The capability salience vector: token weights plus a monotone link to a benchmark score.

``score = lo + (hi - lo) * sigmoid(-k * (L - L0))`` with ``L = sum_i w_i * loss_i``, ``w >= 0``,
``sum(w) = 1`` and ``k > 0``: the score falls from ``hi`` (low loss) to ``lo`` (high loss).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.special import expit

from ._checks import as_float_array
from .probe import ProbeMismatchError, ProbeSet, atomic_save, read_safetensors

FORMAT = "csv_callback.salience/1"


@dataclass(frozen=True)
class SigmoidLink:
    """Monotone decreasing map from a (weighted) loss to a score."""

    lo: float
    hi: float
    k: float
    L0: float

    def __post_init__(self) -> None:
        vals = (self.lo, self.hi, self.k, self.L0)
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"SigmoidLink parameters must be finite, got {vals}.")
        if not self.k > 0:
            raise ValueError(f"SigmoidLink needs k > 0 (a score that falls as loss rises), got k={self.k}.")
        if not self.hi >= self.lo:
            raise ValueError(f"SigmoidLink needs hi >= lo, got lo={self.lo}, hi={self.hi}.")

    def __call__(self, loss: np.ndarray | float) -> np.ndarray:
        """Score(s) for loss(es) of any shape."""
        return self.lo + (self.hi - self.lo) * expit(-self.k * (np.asarray(loss, dtype=np.float64) - self.L0))


@dataclass
class SalienceVector:
    """Token weights over one probe's scored tokens, a link to one task's score, and provenance.

    Attributes:
        weights: float64 ``[n_tokens]``, non-negative, summing to 1.
        link: the weighted loss -> score map.
        task, metric: what the score is (e.g. ``"arc_easy"``, ``"acc"``).
        probe_fingerprint: :attr:`ProbeSet.fingerprint` of the probe the weights index.
        tokenizer_hash: vocabulary hash of the probe's tokenizer.
        loss_range: (min, max) weighted loss seen in fitting; predictions outside it extrapolate.
        fit_report: how the vector was fitted (JSON-serialisable), e.g. cross-validated errors.
    """

    weights: np.ndarray
    link: SigmoidLink
    task: str = "task"
    metric: str = "acc"
    probe_fingerprint: str = ""
    tokenizer_hash: str = ""
    loss_range: tuple[float, float] = (-math.inf, math.inf)
    fit_report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = as_float_array(self.weights, "weights", 1)
        if (w < 0).any():
            raise ValueError(f"salience weights must be non-negative; {int((w < 0).sum())} are negative.")
        if abs(w.sum() - 1.0) > 1e-6:
            raise ValueError(f"salience weights must sum to 1, they sum to {w.sum():.9g}.")
        self.weights = w
        self.loss_range = (float(self.loss_range[0]), float(self.loss_range[1]))

    @property
    def n_tokens(self) -> int:
        return len(self.weights)

    def check_probe(self, probe: ProbeSet) -> None:
        """Raise :class:`ProbeMismatchError` unless this vector was fitted on ``probe``."""
        if probe.n_tokens != self.n_tokens or (self.probe_fingerprint and probe.fingerprint != self.probe_fingerprint):
            raise ProbeMismatchError(
                f"salience vector {self.task!r} was fitted on probe {self.probe_fingerprint or '?'} with "
                f"{self.n_tokens} tokens, but the probe given is {probe.fingerprint} with {probe.n_tokens} tokens; "
                "use the probe file shipped with the vector, or refit the vector on this probe."
            )

    def weighted_loss(self, losses: Any, fingerprint: str | None = None) -> np.ndarray | float:
        """Salience-weighted loss of ``losses`` ``[n_tokens]`` (a float) or ``[m, n_tokens]`` (``[m]``).

        ``fingerprint``, when given, is the probe fingerprint the losses were computed on; a mismatch raises
        :class:`ProbeMismatchError`. NaN/inf losses raise ValueError.
        """
        if fingerprint is not None and self.probe_fingerprint and fingerprint != self.probe_fingerprint:
            raise ProbeMismatchError(
                f"these losses come from probe {fingerprint}, but salience vector {self.task!r} was fitted on "
                f"probe {self.probe_fingerprint}; compute the losses on the vector's own probe."
            )
        x = as_float_array(losses, "losses", (1, 2))
        if x.shape[-1] != self.n_tokens:
            raise ProbeMismatchError(
                f"losses have {x.shape[-1]} tokens per row but salience vector {self.task!r} has {self.n_tokens}; "
                "the losses were computed on a different probe."
            )
        wl = x @ self.weights
        return float(wl) if x.ndim == 1 else wl

    def predict(self, losses: Any, fingerprint: str | None = None) -> np.ndarray | float:
        """Predicted score for ``losses`` ``[n_tokens]`` (a float) or ``[m, n_tokens]`` (``[m]``)."""
        score = self.link(self.weighted_loss(losses, fingerprint))
        return float(score) if np.ndim(score) == 0 else score

    def extrapolates(self, weighted_loss: float | np.ndarray) -> bool | np.ndarray:
        """True where a weighted loss lies outside the range seen in fitting."""
        lo, hi = self.loss_range
        wl = np.asarray(weighted_loss)
        out = (wl < lo) | (wl > hi)
        return bool(out) if out.ndim == 0 else out

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write one .safetensors file: the weights as a tensor, everything else as JSON metadata."""
        meta = {
            "link": asdict(self.link),
            "task": self.task,
            "metric": self.metric,
            "probe_fingerprint": self.probe_fingerprint,
            "tokenizer_hash": self.tokenizer_hash,
            "loss_range": list(self.loss_range),
            "fit_report": self.fit_report,
        }
        atomic_save({"weights": torch.from_numpy(self.weights)}, {"format": FORMAT, "json": json.dumps(meta)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SalienceVector":
        """Read a vector written by :meth:`save`; ValueError if the file is missing, corrupt or not a vector."""
        tensors, raw = read_safetensors(path, FORMAT, ("weights",))
        try:
            meta = json.loads(raw["json"])
            link = SigmoidLink(**meta.pop("link"))
            meta["loss_range"] = tuple(meta["loss_range"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the salience metadata is missing or malformed ({e}).") from e
        return cls(weights=tensors["weights"].numpy(), link=link, **meta)

    def __repr__(self) -> str:
        return (
            f"SalienceVector(task={self.task!r}, metric={self.metric!r}, n_tokens={self.n_tokens}, "
            f"probe={self.probe_fingerprint!r}, link={self.link})"
        )
