"""The capability salience vector: token weights plus a monotone link to a benchmark score.

``score = lo + (hi - lo) * sigmoid(-k * (L - L0))`` with ``L = sum_i w_i * loss_i``, ``w >= 0``,
``sum(w) = 1`` and ``k > 0``: the score falls from ``hi`` (low loss) to ``lo`` (high loss).

A vector records the range its scores can take (``score_range``): ``(a, b)`` for a bounded score such as an
accuracy (``(0, 1)``), ``(-inf, inf)`` for an unbounded one. A bounded range bounds the link as the OLMo
ladder's fit bounds an accuracy: ``hi`` in ``[a, b]`` and ``hi - lo`` at most ``b - a``, so no prediction
exceeds ``b`` and none falls below ``2a - b``; a vector whose link breaks that is refused, whoever wrote it.

A vector from :func:`~csv_callback.fit.fit_salience` also carries its cross-validation's held-out residuals
(``fit_report["interval"]``), from which :meth:`SalienceVector.predict_interval` makes split-conformal
prediction intervals.

A *domain vector* weighs the mean losses of named validation sets (``domains``, e.g. ``("c4", "wikitext")``)
instead of a probe's tokens: the same weights and link at a coarser grain, fitted from the validation losses a
training loop already logs. It records its domain names, in order, in place of a probe fingerprint, and
refuses losses of other domains or in another order (:meth:`SalienceVector.check_domains`,
:meth:`SalienceVector.domain_losses`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from scipy.special import expit

from ._checks import as_float_array, as_float_tuple, parse_json, require_json_depth, require_str
from .files import atomic_save, malformed_file, read_safetensors
from .probe import ProbeMismatchError, ProbeSet

# Format 2 added score_range; format 1 files are still read (see SalienceVector.score_range for their range).
# Domain vectors are written in format 3 (their domain names), token vectors still in format 2, so that a version
# that knows no domains refuses a domain vector instead of applying it to a probe's token losses.
FORMAT = "csv_callback.salience/2"
DOMAIN_FORMAT = "csv_callback.salience/3"
_FORMAT_1 = "csv_callback.salience/1"
_META_KEYS_1 = ("link", "task", "metric", "probe_fingerprint", "tokenizer_hash", "loss_range", "fit_report")
_META_KEYS = (*_META_KEYS_1, "score_range")
_META_KEYS_3 = (*_META_KEYS, "domains")
_LINK_KEYS = ("lo", "hi", "k", "L0")
_RANGE_RTOL = 1e-9
# weighted_loss converts its input to float64 this many bytes at a time: small next to a table of gigabytes.
_CHUNK_BYTES = 2**27
# fit_salience's reports nest 3 levels; the limit keeps json.dumps and the report's walks clear of Python's
# recursion limit, wherever in a deep call stack (a Trainer's callbacks) a vector is loaded or saved.
_REPORT_DEPTH = 32
FRACTION = (0.0, 1.0)
UNBOUNDED = (-math.inf, math.inf)
# fit_report key of what predict_interval needs: {"method": INTERVAL_METHOD, "abs_residuals": sorted [m]}. It lives in
# the report, which every format stores, so no format change: files written with it still load in older versions,
# and vectors fitted before it have no intervals (NaN, warned once per vector).
INTERVAL_KEY = "interval"
INTERVAL_METHOD = "split-conformal"


def named_score_range(metric: str) -> tuple[float, float] | None:
    """The score range a metric's name declares: ``FRACTION`` for ``"acc"`` (lm-eval-harness's accuracy, the
    default metric here), else None (the name says nothing about the range)."""
    return FRACTION if metric == "acc" else None


def check_score_range(value: Any, name: str = "score_range") -> tuple[float, float]:
    """``value`` as a score range: ``(a, b)`` with finite ``a < b``, or ``(-inf, inf)`` for an unbounded score."""
    a, b = as_float_tuple(value, name, 2, "a (lo, hi) pair of numbers, e.g. (0, 1)")
    if (a, b) != UNBOUNDED and not (math.isfinite(a) and math.isfinite(b) and a < b):
        raise ValueError(
            f"{name} must be (lo, hi) with finite lo < hi, or (-inf, inf) for an unbounded score, got {value!r}; "
            "a half-bounded range bounds no link, so declare (-inf, inf) for one."
        )
    return a, b


@dataclass(frozen=True)
class SigmoidLink:
    """Monotone decreasing map from a (weighted) loss to a score."""

    lo: float
    hi: float
    k: float
    L0: float

    def __post_init__(self) -> None:
        vals = (self.lo, self.hi, self.k, self.L0)
        # A bool is a number to Python but no parameter; a str would fail later, inside numpy.
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in vals):
            raise ValueError(f"SigmoidLink parameters must be real numbers, got {vals}.")
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"SigmoidLink parameters must be finite, got {vals}.")
        if not self.k > 0:
            raise ValueError(f"SigmoidLink needs k > 0 (a score that falls as loss rises), got k={self.k}.")
        if not self.hi >= self.lo:
            raise ValueError(f"SigmoidLink needs hi >= lo, got lo={self.lo}, hi={self.hi}.")
        if not math.isfinite(self.hi - self.lo):  # every score would be inf or NaN
            raise ValueError(f"SigmoidLink needs a finite hi - lo, got lo={self.lo}, hi={self.hi}, whose difference "
                             "overflows float64.")

    def check_range(self, score_range: tuple[float, float]) -> None:
        """Raise ValueError unless this link fits ``score_range`` (checked with :func:`check_score_range`): within
        a bounded ``(a, b)``, ``hi`` lies in ``[a, b]`` and ``hi - lo`` is at most ``b - a``, the bounds
        :func:`~csv_callback.fit.fit_link` fits within; any link fits an unbounded range."""
        a, b = score_range
        if (a, b) == UNBOUNDED:
            return
        slack = _RANGE_RTOL * (b - a)  # fit_link's lo is hi - span: hi - lo can round a few ulps past span
        if not (a - slack <= self.hi <= b + slack and self.hi - self.lo <= b - a + slack):
            raise ValueError(
                f"link lo={self.lo:.6g}, hi={self.hi:.6g} does not fit the score range [{a:g}, {b:g}]: its scores "
                f"reach {self.hi:.6g} and {self.lo:.6g}, but a link of that range has hi in [{a:g}, {b:g}] and "
                f"hi - lo <= {b - a:g}; re-fit the vector (fit_salience bounds its link by the score range)"
            )

    def __call__(self, loss: np.ndarray | float) -> np.ndarray:
        """Score(s) for loss(es) of any shape."""
        return self.lo + (self.hi - self.lo) * expit(-self.k * (np.asarray(loss, dtype=np.float64) - self.L0))

    # The coordinates fit_link and the joint solver optimise: p = (span, L0, k, hi) with lo = hi - span, the OLMo
    # ladder's (a = -span, L0, k, b = hi), whose box bounds (:func:`link_bounds`) keep an accuracy curve inside
    # [0, 1] at its low-loss end.
    @property
    def params(self) -> np.ndarray:
        """float64 ``[4]``: ``(hi - lo, L0, k, hi)``, the link as :func:`link_bounds` and :func:`link_curve` take it."""
        return np.array([self.hi - self.lo, self.L0, self.k, self.hi], dtype=np.float64)

    @classmethod
    def from_params(cls, p: np.ndarray) -> SigmoidLink:
        """The link of parameters ``p`` ``[4]`` (see :attr:`params`)."""
        span, L0, k, hi = (float(v) for v in p)
        return cls(lo=hi - span, hi=hi, k=k, L0=L0)


def link_bounds(score_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``[4]`` lower and upper bounds of :attr:`SigmoidLink.params` for a link of ``score_range``: within a
    bounded ``(a, b)``, ``hi - lo`` in ``[0, b - a]``, ``L0 >= 0``, ``k > 0`` and ``hi`` in ``[a, b]`` (for
    ``(0, 1)`` the OLMo ladder's box, to the bit); an unbounded range leaves ``lo``, ``hi`` and ``L0`` free."""
    a, b = score_range
    if score_range != UNBOUNDED:
        return np.array([0.0, 0.0, 1e-8, a]), np.array([b - a, np.inf, np.inf, b])
    return np.array([0.0, -np.inf, 1e-8, -np.inf]), np.array([np.inf, np.inf, np.inf, np.inf])


def link_curve(p: np.ndarray, L: np.ndarray, grad: bool = False):
    """Scores ``[m]`` of the link of parameters ``p`` ``[4]`` (see :attr:`SigmoidLink.params`) at losses ``L``
    ``[m]``; with ``grad`` also d score / d L ``[m]`` and d score / d p ``[m, 4]`` (else None for both)."""
    span, L0, k, hi = p
    sig = expit(-k * (L - L0))
    s = hi - span * (1.0 - sig)
    if not grad:
        return s, None, None
    d = span * sig * (1.0 - sig)  # d s / d u, u = -k (L - L0)
    ds_dp = np.stack([sig - 1.0, d * k, -d * (L - L0), np.ones_like(L)], axis=1)
    return s, -d * k, ds_dp


@dataclass
class SalienceVector:
    """Token weights over one probe's scored tokens, a link to one task's score, and provenance.

    Attributes:
        weights: float64 ``[n_tokens]``, non-negative, summing to 1.
        link: the weighted loss -> score map.
        task, metric: what the score is (e.g. ``"arc_easy"``, ``"acc"``).
        probe_fingerprint: :attr:`ProbeSet.fingerprint` of the probe the weights index; ``""`` (a vector fitted
            with ``probe=None``) matches no probe: :meth:`check_probe` refuses it.
        tokenizer_hash: vocabulary hash of the probe's tokenizer.
        loss_range: (min, max) weighted loss seen in fitting; predictions outside it extrapolate.
        fit_report: how the vector was fitted (JSON-serialisable, at most ``_REPORT_DEPTH`` levels deep), e.g.
            cross-validated errors.
        score_range: (lo, hi) the scores can take, which bounds the link (see the module docstring). None, as in
            files written before the range was recorded, means the range ``metric`` names: ``(0, 1)`` for
            ``"acc"``, else ``(-inf, inf)``, the range such a vector was fitted for.
        domains: for a domain vector, the names of the validation sets its weights index, in order (distinct,
            non-empty; one per weight); then it has no probe fingerprint. None for a token vector.
    """

    weights: np.ndarray
    link: SigmoidLink
    task: str = "task"
    metric: str = "acc"
    probe_fingerprint: str = ""
    tokenizer_hash: str = ""
    loss_range: tuple[float, float] = (-math.inf, math.inf)
    fit_report: dict[str, Any] = field(default_factory=dict)
    score_range: tuple[float, float] | None = None
    domains: tuple[str, ...] | None = None
    _warned_no_interval: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        w = as_float_array(self.weights, "weights", 1, fix="re-fit the vector")
        if (w < 0).any():
            raise ValueError(f"salience weights must be non-negative; {int((w < 0).sum())} are negative.")
        if abs(w.sum() - 1.0) > 1e-6:
            raise ValueError(f"salience weights must sum to 1, they sum to {w.sum():.9g}.")
        if not isinstance(self.link, SigmoidLink):
            raise ValueError(
                f"link must be a SigmoidLink, got {type(self.link).__name__}; build one with "
                "SigmoidLink(lo, hi, k, L0) or fit_link(loss, scores)."
            )
        lo, hi = as_float_tuple(self.loss_range, "loss_range", 2, "a (min, max) pair of weighted losses")
        # NaN compares False both ways, so such a range would never flag extrapolation; a reversed one always would.
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ValueError(
                f"loss_range must be (min, max) with min <= max and no NaN, got {self.loss_range!r}; pass the "
                "range of weighted losses seen in fitting, or (-inf, inf) when it is unknown."
            )
        for name in ("task", "metric"):
            require_str(getattr(self, name), name)
        for name in ("probe_fingerprint", "tokenizer_hash"):
            require_str(getattr(self, name), name, allow_empty=True)
        if not isinstance(self.fit_report, dict):
            raise ValueError(f"fit_report must be a dict, got {type(self.fit_report).__name__}.")
        require_json_depth(self.fit_report, "fit_report", _REPORT_DEPTH)
        if INTERVAL_KEY in self.fit_report:
            _check_interval(self.fit_report[INTERVAL_KEY])
        if self.score_range is None:
            self.score_range = named_score_range(self.metric) or UNBOUNDED
        self.score_range = check_score_range(self.score_range)
        self.link.check_range(self.score_range)
        if self.domains is not None:
            self.domains = check_domain_names(self.domains, len(w))
            if self.probe_fingerprint or self.tokenizer_hash:
                raise ValueError(f"a domain vector has no probe: its weights index the domains "
                                 f"{list(self.domains)[:5]}, so probe_fingerprint and tokenizer_hash must be empty.")
        self.weights = w
        self.loss_range = (lo, hi)

    @property
    def n_tokens(self) -> int:
        return len(self.weights)

    def check_probe(self, probe: ProbeSet) -> None:
        """Raise :class:`ProbeMismatchError` unless this vector was fitted on ``probe``.

        A vector without a fingerprint (fitted with ``probe=None``) is refused too: nothing shows which probe
        its weights index, and any probe of the same length would otherwise pass. So is a domain vector.
        """
        self._require_fingerprint(probe.fingerprint)
        if probe.n_tokens != self.n_tokens or probe.fingerprint != self.probe_fingerprint:
            raise ProbeMismatchError(
                f"salience vector {self.task!r} was fitted on probe {self.probe_fingerprint} with "
                f"{self.n_tokens} tokens, but the probe given is {probe.fingerprint} with {probe.n_tokens} tokens; "
                "use the probe file shipped with the vector, or refit the vector on this probe."
            )

    def weighted_loss(self, losses: Any, fingerprint: str | None = None) -> np.ndarray | float:
        """Salience-weighted loss of ``losses`` ``[n_tokens]`` (a float) or ``[m, n_tokens]`` (``[m]``).

        ``fingerprint``, when given, is the probe fingerprint the losses were computed on; a mismatch, or a
        vector without a fingerprint (see :meth:`check_probe`), raises :class:`ProbeMismatchError`. NaN/inf
        losses raise ValueError. A large table is converted to float64 a chunk of rows at a time (128 MiB of
        float64 each), so a float32 table of gigabytes is never copied whole.
        """
        if fingerprint is not None:
            self._require_fingerprint(fingerprint)
            if fingerprint != self.probe_fingerprint:
                raise ProbeMismatchError(
                    f"these losses come from probe {fingerprint}, but salience vector {self.task!r} was fitted on "
                    f"probe {self.probe_fingerprint}; compute the losses on the vector's own probe."
                )
        rows = max(1, _CHUNK_BYTES // (8 * self.n_tokens))
        if isinstance(losses, (np.ndarray, torch.Tensor)) and losses.ndim == 2 and len(losses) > rows:
            # A float32 table of gigabytes: float64 a chunk of rows at a time, never a float64 copy of it all.
            self._require_tokens(losses.shape[-1])
            return np.concatenate([self._weighted_rows(losses[a : a + rows], f"losses[{a}:{a + rows}]")
                                   for a in range(0, len(losses), rows)])
        wl = self._weighted_rows(losses, "losses")
        return float(wl) if wl.ndim == 0 else wl

    def _weighted_rows(self, losses: Any, name: str) -> np.ndarray:
        """float64 ``[]`` or ``[m]``: ``losses`` ``[n_tokens]`` or ``[m, n_tokens]`` (called ``name`` in errors),
        checked and converted to float64, times the weights."""
        x = as_float_array(losses, name, (1, 2))
        self._require_tokens(x.shape[-1])
        return x @ self.weights

    def _require_tokens(self, n: int) -> None:
        if n != self.n_tokens and self.domains is not None:
            raise ProbeMismatchError(f"losses have {n} values per row but domain vector {self.task!r} weighs "
                                     f"{self.n_tokens} domains {list(self.domains)[:10]}; pass one loss per domain.")
        if n != self.n_tokens:
            raise ProbeMismatchError(
                f"losses have {n} tokens per row but salience vector {self.task!r} has {self.n_tokens}; "
                "the losses were computed on a different probe."
            )

    def check_domains(self, names: Any) -> None:
        """Raise :class:`ProbeMismatchError` unless ``names`` (a sequence of str: the columns of a loss table) are
        this domain vector's domains in its order; a token vector is refused too."""
        if self.domains is None:
            raise ProbeMismatchError(f"salience vector {self.task!r} weighs the tokens of probe "
                                     f"{self.probe_fingerprint or '(none recorded)'}, not validation domains; apply "
                                     "it to the probe's per-token losses, or fit a domain vector (fit_salience(..., "
                                     "domains=[...])).")
        got = tuple(names) if isinstance(names, (list, tuple)) else None
        if got != self.domains:
            detail = ("the same domains in another order" if got is not None and sorted(got) == sorted(self.domains)
                      else f"missing {[d for d in self.domains if d not in (got or ())]}, unknown "
                           f"{[d for d in (got or ()) if d not in self.domains]}")
            raise ProbeMismatchError(f"domain vector {self.task!r} weighs the losses of {list(self.domains)}, in that "
                                     f"order, but the losses given are of {names!r} ({detail}); pass one loss per "
                                     "domain in the vector's order (domain_losses() orders a dict by name).")

    def domain_losses(self, losses: Mapping[str, Any]) -> np.ndarray:
        """float64 ``[n_domains]``: ``losses``, a mapping of domain name -> mean loss (floats or 0-d tensors), in
        this domain vector's order. Every domain must be there, and no other name (it would be silently ignored).
        Values are not checked for NaN/inf here: :meth:`weighted_loss` refuses them."""
        if self.domains is None:
            self.check_domains(())  # names the problem: a token vector
        if not isinstance(losses, Mapping):
            raise ValueError(f"domain_losses takes a mapping of domain name -> loss, got {type(losses).__name__}.")
        missing = [d for d in self.domains if d not in losses]
        unknown = [k for k in losses if k not in self.domains]
        if missing or unknown:
            raise ProbeMismatchError(f"domain vector {self.task!r} weighs the losses of {list(self.domains)}, but the "
                                     f"losses given miss {missing} and have unknown {unknown}; pass one loss per "
                                     "domain, named as the vector names them.")
        try:
            return np.array([float(losses[d]) for d in self.domains], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"domain losses must be numbers ({e}).") from None

    def _require_fingerprint(self, against: str) -> None:
        """Raise :class:`ProbeMismatchError` if this vector has no probe fingerprint to compare with probe
        ``against``'s: the one rule for unfingerprinted vectors, which everything that checks a probe follows."""
        if self.domains is not None:
            raise ProbeMismatchError(f"salience vector {self.task!r} is a domain vector over {list(self.domains)}, "
                                     f"not a token vector of probe {against}; apply it to those domains' losses.")
        if not self.probe_fingerprint:
            raise ProbeMismatchError(
                f"salience vector {self.task!r} has no probe fingerprint (it was fitted with probe=None), so nothing "
                f"shows that it belongs to probe {against}; re-fit it with fit_salience(..., probe=probe), or, after "
                "checking that it was fitted on this probe's losses, set vector.probe_fingerprint = probe.fingerprint "
                "(and save it)."
            )

    def predict(self, losses: Any, fingerprint: str | None = None) -> np.ndarray | float:
        """Predicted score for ``losses`` ``[n_tokens]`` (a float) or ``[m, n_tokens]`` (``[m]``)."""
        score = self.link(self.weighted_loss(losses, fingerprint))
        return float(score) if np.ndim(score) == 0 else score

    def predict_interval(
        self, losses: Any, level: float = 0.8, fingerprint: str | None = None
    ) -> tuple[np.ndarray | float, np.ndarray | float]:
        """``(lo, hi)``: a prediction interval at ``level`` for ``losses`` ``[n_tokens]`` (two floats) or
        ``[m, n_tokens]`` (two ``[m]`` arrays), shaped like :meth:`predict`'s output; see :meth:`interval`."""
        level = check_level(level)
        return self.interval(self.weighted_loss(losses, fingerprint), level)

    def interval(
        self, weighted_loss: float | np.ndarray, level: float = 0.8
    ) -> tuple[np.ndarray | float, np.ndarray | float]:
        """``(lo, hi)`` around ``self.link(weighted_loss)`` (a float or an array of any shape) at ``level`` in (0, 1).

        Within the fitted loss range: split-conformal on the fit's honest held-out residuals (checkpoint j's
        prediction by the fold that held it out, ``fit_report["interval"]``): of the m sorted absolute residuals
        the ``ceil((m + 1) * level)``-th smallest is the half-width, or, when that exceeds m, an infinite one
        (too few checkpoints to support the level). Outside the range the half-width grows by ``d``, the score
        distance between the prediction and the prediction at the range's nearest end: the side towards the
        fitted data then ends where the conformal interval at that end does (the score is monotone in the loss),
        and the far side allows the link's own extrapolated move to be off by as much again. Both ends are
        clipped to :attr:`score_range`. A NaN or infinite weighted loss gives NaN, and so does a vector without
        stored residuals (fitted before intervals existed, or built by hand), with one warning per vector.
        """
        level = check_level(level)
        wl = np.asarray(weighted_loss, dtype=np.float64)
        pred = self.link(wl)
        half = self._conformal_half_width(level)
        half = half + np.abs(pred - self.link(np.clip(wl, *self.loss_range)))
        bad = ~np.isfinite(wl)
        lo = np.where(bad, np.nan, np.clip(pred - half, *self.score_range))
        hi = np.where(bad, np.nan, np.clip(pred + half, *self.score_range))
        return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)

    def _conformal_half_width(self, level: float) -> float:
        """The within-range half-width at ``level`` (see :meth:`interval`); NaN, warned once, without residuals."""
        stored = self.fit_report.get(INTERVAL_KEY)
        if stored is None:
            if not self._warned_no_interval:
                self._warned_no_interval = True
                warnings.warn(
                    f"salience vector {self.task!r} stores no held-out residuals (it was fitted before prediction "
                    "intervals existed, or built by hand), so its intervals are NaN; re-fit it with fit_salience to "
                    "get calibrated intervals.", RuntimeWarning, stacklevel=4)
            return math.nan
        return conformal_quantile(stored["abs_residuals"], level)

    def score_interval(
        self, loss: float, loss_lo: float, loss_hi: float, level: float = 0.8
    ) -> tuple[float, float, float]:
        """``(pred, lo, hi)`` for a weighted loss that is itself uncertain: known to lie in ``(loss_lo, loss_hi)`` at
        ``level``, its best value ``loss`` (a forecast, a scaling law's prediction). Each side of the score interval
        combines in quadrature the move the link makes over the loss interval and the link's own interval at
        ``loss`` (:meth:`interval`; NaN bounds without stored residuals, as there), clipped to the score range."""
        pred = float(self.link(loss))
        link_lo, link_hi = self.interval(loss, level)
        # The link is decreasing: the loss interval's high end gives the score's low end.
        down = math.hypot(pred - float(self.link(loss_hi)), pred - link_lo)
        up = math.hypot(float(self.link(loss_lo)) - pred, link_hi - pred)
        a, b = self.score_range
        return pred, float(np.clip(pred - down, a, b)), float(np.clip(pred + up, a, b))

    def extrapolates(self, weighted_loss: float | np.ndarray) -> bool | np.ndarray:
        """True where a weighted loss (a float or an array of any shape) lies outside the range seen in fitting.

        A NaN or infinite weighted loss counts as extrapolating: no prediction made from it can be trusted.
        """
        lo, hi = self.loss_range
        # A weighted loss computed from a matrix of rows and one computed from a single row round differently
        # (float64 dot products, ~1e-16 relative), so a fitting checkpoint at an end of the range must not be
        # flagged by that; 1e-9 of the range's scale is far below any real extrapolation.
        slack = _RANGE_RTOL * max((abs(v) for v in (lo, hi) if math.isfinite(v)), default=1.0)
        wl = np.asarray(weighted_loss, dtype=np.float64)
        out = ~((wl >= lo - slack) & (wl <= hi + slack) & np.isfinite(wl))
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
            "score_range": list(self.score_range),
        }
        fmt = FORMAT
        if self.domains is not None:
            meta["domains"], fmt = list(self.domains), DOMAIN_FORMAT
        atomic_save({"weights": torch.from_numpy(self.weights)}, {"format": fmt, "json": json.dumps(meta)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SalienceVector:
        """Read a vector written by :meth:`save` (format 2, or 3 for a domain vector), or by a version that wrote
        format 1 (no ``score_range``).

        Raises FileNotFoundError for a missing file and ValueError naming the file for anything else: not a
        safetensors file, another format, or a vector whose metadata or weights are malformed, including a link
        outside the vector's score range.
        """
        declared = _declared_format(path)
        fmt = declared if declared in (_FORMAT_1, DOMAIN_FORMAT) else FORMAT
        tensors, raw = read_safetensors(path, fmt, ("weights",))
        with malformed_file(path, "salience vector", "re-fit or re-save it"):
            if "json" not in raw:
                raise ValueError("its metadata has no 'json' entry")
            meta = parse_json(raw["json"], "its metadata")
            keys = {_FORMAT_1: _META_KEYS_1, DOMAIN_FORMAT: _META_KEYS_3}.get(fmt, _META_KEYS)
            _require_keys(meta, keys, "its metadata")
            _require_keys(meta["link"], _LINK_KEYS, "its link")
            weights = tensors["weights"]
            if weights.dtype != torch.float64:  # save() writes float64; anything else was written by another tool
                raise ValueError(f"the weights are {weights.dtype}, not torch.float64")
            if "domains" in meta:
                meta["domains"] = check_domain_names(meta["domains"], len(weights))
            return cls(weights=weights.numpy(), **{**meta, "link": SigmoidLink(**meta["link"])})

    def __repr__(self) -> str:
        over = f"domains={list(self.domains)}" if self.domains is not None else \
            f"n_tokens={self.n_tokens}, probe={self.probe_fingerprint!r}"
        return (f"SalienceVector(task={self.task!r}, metric={self.metric!r}, {over}, link={self.link}, "
                f"score_range={self.score_range})")


def check_level(level: Any, name: str = "level") -> float:
    """``level`` as a coverage level: a real number strictly between 0 and 1."""
    if not isinstance(level, numbers.Real) or isinstance(level, bool) or not 0 < float(level) < 1:
        raise ValueError(f"{name} must be a number strictly between 0 and 1 (the interval's coverage, e.g. 0.8), "
                         f"got {level!r}.")
    return float(level)


def conformal_quantile(abs_residuals: Any, level: float) -> float:
    """Split-conformal half-width: the ``ceil((m + 1) * level)``-th smallest of the ``m`` sorted absolute residuals
    ``abs_residuals`` ``[m]``, or inf when that rank exceeds m (the finite-sample correction: a new point's residual
    is as likely to rank anywhere among m + 1)."""
    r = np.asarray(abs_residuals, dtype=np.float64)
    # The tolerance keeps (m + 1) * level that is an integer up to rounding (e.g. 10 * 0.8) at that integer.
    rank = math.ceil((len(r) + 1) * level - 1e-9)
    return float(r[rank - 1]) if rank <= len(r) else math.inf


def _check_interval(stored: Any) -> None:
    """Raise ValueError unless ``stored`` is what :func:`~csv_callback.fit.fit_salience` stores under
    ``fit_report["interval"]``: the method and a non-empty, sorted list of finite absolute residuals."""
    fix = "re-fit the vector, or delete fit_report['interval'] (its intervals are then NaN)"
    if not isinstance(stored, dict) or stored.get("method") != INTERVAL_METHOD or "abs_residuals" not in stored:
        raise ValueError(f"fit_report['interval'] must be {{'method': {INTERVAL_METHOD!r}, 'abs_residuals': [...]}}, "
                         f"got {str(stored)[:80]}; {fix}.")
    r = stored["abs_residuals"]
    ok = isinstance(r, list) and r and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in r)
    r = np.asarray(r, dtype=np.float64) if ok else None
    if r is None or not np.isfinite(r).all() or (r < 0).any() or (np.diff(r) < 0).any():
        raise ValueError(f"fit_report['interval']['abs_residuals'] must be a non-empty, sorted list of finite numbers "
                         f">= 0; {fix}.")


def check_domain_names(domains: Any, n: int) -> tuple[str, ...]:
    """``domains`` as a tuple of ``n`` distinct non-empty str, or ValueError saying what is wrong."""
    names = tuple(domains) if isinstance(domains, (list, tuple)) else None
    if names is None or not all(isinstance(d, str) and d for d in names):
        raise ValueError(f"domains must be a list of non-empty str (the validation sets' names), got {domains!r}.")
    if len(names) != n:
        raise ValueError(f"a domain vector has one weight per domain, but {n} weights and {len(names)} domains "
                         f"{list(names)[:10]} were given.")
    twice = sorted({d for d in names if names.count(d) > 1})
    if twice:
        raise ValueError(f"domain names must be distinct, but {twice} appear more than once.")
    return names


def _declared_format(path: str | os.PathLike) -> str | None:
    """The format ``path``'s header declares, or None when it has none or cannot be read (read_safetensors then
    says why). Only the header is read, and only from a regular file: opening a FIFO would block."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError):
        return None


def _require_keys(obj: Any, keys: tuple[str, ...], what: str) -> None:
    """Raise ValueError unless ``obj`` is a dict with exactly ``keys``."""
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is a JSON {type(obj).__name__}, not an object with keys {list(keys)}")
    missing, unknown = [k for k in keys if k not in obj], sorted(set(obj) - set(keys))
    if missing or unknown:
        found = [f"{label} keys {ks}" for label, ks in (("missing", missing), ("unknown", unknown)) if ks]
        raise ValueError(f"{what} has {' and '.join(found)}; expected exactly {list(keys)}")
