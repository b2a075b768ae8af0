"""Forecasting a run's end-of-training score from its own history and from the runs its vector was fitted on.

A run's weighted loss ``L(x)`` at training positions ``x`` (steps or tokens seen) is known up to its last
validation; the question is ``L(x_end)`` and the score the vector's link gives it. Two estimates of the remaining
drop ``L(x_last) - L(x_end)``:

- the run's own trend: a saturating power law ``L = E + A * x**-alpha`` (the Chinchilla form in data) fitted to its
  history. Under a decaying learning rate (cosine, linear) the loss falls faster near the end than a law fitted
  early says (Tissue et al. 2024, arXiv 2408.11029), so alone it forecasts too small a drop;
- the trajectory prior: how the weighted loss of the vector's complete fitting runs moved from the same relative
  position ``x / x_end`` to their end, under their schedule. Each fitting run's drop is scaled by the ratio of the
  two runs' drops over the stretch both observed (a power law's amplitude sets both), and the median over
  fitting runs is the estimate. It assumes the run shares the fitting runs' schedule shape.

The two are combined by inverse-variance weights, the variances being each method's mean squared error on the
fitting runs themselves at nearby relative positions (computed by :func:`trajectory_prior`: every fitting run cut
at each of its checkpoints, forecast by its own trend and by the prior of the other fitting runs). The weighted
loss's interval is normal with the combined variance plus the spread between the two estimates
(``w_t * w_p * (m_t - m_p)**2``, the variance of the two-component mixture), extended to contain both estimates,
so it widens when they disagree; it is mapped through the link and combined in quadrature with the link's own interval
(:meth:`~csv_callback.SalienceVector.interval`).

The prior is plain numbers stored in the vector's ``fit_report["trajectory_prior"]`` (see :func:`with_prior`), so
it travels with the vector file.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import norm

from ._checks import as_float_array
from .salience import SalienceVector, check_level

PRIOR_KEY = "trajectory_prior"
MIN_POINTS = 3  # the own trend has three parameters
# Calibration cuts count towards a position's error by a Gaussian kernel in log(x / x_end) of this width: cuts at
# half or twice the position weigh exp(-0.5 * (ln 2 / 0.5)**2) = 0.38 of an exact match.
_KERNEL_WIDTH = 0.5
_ALPHA_BOUNDS = (0.02, 3.0)


def _trend_forecast(x: np.ndarray, wl: np.ndarray, x_end: float) -> float:
    """The saturating power law ``E + A * x**-alpha`` least-squares fitted to ``wl`` ``[n]`` at ``x`` ``[n]``
    (``n >= MIN_POINTS``, validated by the caller), evaluated at ``x_end``; ``E`` in ``[0, min(wl)]``, ``A >= 0``."""
    scale = x[-1]
    u = x / scale
    floor = float(wl.min())

    def resid(p: np.ndarray) -> np.ndarray:
        E, A, alpha = p
        return E + A * u**-alpha - wl

    best = None
    for alpha0 in (0.1, 0.5, 1.5):
        A0 = max(float(wl[0] - wl[-1]) / max(u[0] ** -alpha0 - 1.0, 1e-12), 1e-12)
        p0 = np.array([max(floor - A0, 0.0), A0, alpha0])
        p0[0] = min(p0[0], floor)
        fit = least_squares(resid, p0, bounds=([0.0, 0.0, _ALPHA_BOUNDS[0]], [floor + 1e-12, np.inf, _ALPHA_BOUNDS[1]]))
        if best is None or fit.cost < best.cost:
            best = fit
    E, A, alpha = best.x
    return float(E + A * (x_end / scale) ** -alpha)


def _prior_drops(pos: np.ndarray, wl: np.ndarray, runs: list[dict]) -> np.ndarray:
    """The remaining drop each fitting run in ``runs`` forecasts for a run at relative positions ``pos`` ``[n]``
    with weighted losses ``wl`` ``[n]``: its own drop from ``pos[-1]`` to its end, scaled by the two runs' drops
    over the stretch both observed. Runs that did not observe ``pos[-1]`` are skipped; ``[k]`` for the others."""
    r_n, out = pos[-1], []
    lp = np.log(pos)
    for run in runs:
        rp, rl = np.log(run["position"]), np.asarray(run["weighted_loss"])
        if rp[0] > np.log(r_n) + 1e-12:
            continue
        at_n = float(np.interp(np.log(r_n), rp, rl))
        drop = at_n - rl[-1]
        start = max(lp[0], rp[0])
        own_seen = float(np.interp(start, lp, wl)) - wl[-1]
        their_seen = float(np.interp(start, rp, rl)) - at_n
        # Without a shared stretch on which both fell, nothing tells the amplitudes apart: take the drop as is.
        scale = own_seen / their_seen if start < np.log(r_n) - 1e-12 and own_seen > 0 and their_seen > 0 else 1.0
        out.append(drop * scale)
    return np.asarray(out, dtype=np.float64)


def _check_history(x: Any, weighted_losses: Any, x_end: Any) -> tuple[np.ndarray, np.ndarray, float]:
    x = as_float_array(x, "x", 1, fix="pass the training positions (steps or tokens) of finished validations")
    wl = as_float_array(weighted_losses, "weighted_losses", 1, fix="drop validations whose loss is not finite")
    if len(x) != len(wl):
        raise ValueError(f"x and weighted_losses must have the same length (one position per validation), got "
                         f"{len(x)} and {len(wl)}.")
    if len(x) < MIN_POINTS:
        raise ValueError(f"forecasting needs at least {MIN_POINTS} validations (the run's own trend has three "
                         f"parameters), got {len(x)}; forecast after more validations.")
    if (x <= 0).any() or (np.diff(x) <= 0).any():
        raise ValueError("x must be positive and strictly increasing (training positions of successive validations, "
                         f"in steps or tokens), got {x.tolist()[:10]}.")
    if not isinstance(x_end, (int, float, np.integer, np.floating)) or isinstance(x_end, bool) \
            or not math.isfinite(float(x_end)) or not float(x_end) > x[-1]:
        raise ValueError(f"x_end must be a finite number beyond the last position in x ({x[-1]:g}), in the same unit "
                         f"(steps or tokens), got {x_end!r}.")
    return x, wl, float(x_end)


def trajectory_prior(vector: SalienceVector, losses: Any, steps: Any, groups: Any, end_steps: Any) -> dict:
    """What ``vector``'s fitting runs teach about the end of a run: a JSON-ready dict for
    ``fit_report["trajectory_prior"]`` (see :func:`with_prior`).

    Args:
        vector: the vector whose weighted loss is forecast (its weights make the trajectories).
        losses: ``[m, n_tokens]`` per-token losses of the fitting runs' checkpoints.
        steps: ``[m]`` each checkpoint's training position (steps or tokens; one unit throughout).
        groups: ``[m]`` each checkpoint's run (any hashable labels).
        end_steps: ``[m]`` the position where each checkpoint's run ended, in the same unit; every run must have
            a checkpoint there (its final loss) and one more before it.

    Returns ``{"runs": [{"position": [x / x_end ...], "weighted_loss": [...]} ...], "calibration": {"position":
    [...], "trend_sq_error": [...], "prior_sq_error": [...]}}``: the trajectories, and each fitting run cut at each
    position with at least ``MIN_POINTS`` checkpoints, forecast by its own trend and by the other runs' prior.
    """
    wl = np.atleast_1d(np.asarray(vector.weighted_loss(losses), dtype=np.float64))
    steps = as_float_array(steps, "steps", 1, fix="pass each checkpoint's training position")
    end_steps = as_float_array(end_steps, "end_steps", 1, fix="pass each checkpoint's run's final position")
    groups = np.asarray(groups, dtype=object)
    if not (len(steps) == len(end_steps) == len(groups) == len(wl)):
        raise ValueError(f"losses, steps, groups and end_steps must describe the same checkpoints, got {len(wl)}, "
                         f"{len(steps)}, {len(groups)} and {len(end_steps)}.")
    runs = []
    for g in dict.fromkeys(groups.tolist()):
        rows = groups == g
        end = np.unique(end_steps[rows])
        if len(end) != 1:
            raise ValueError(f"run {g!r} has several end positions {end.tolist()}; a run ends once.")
        order = np.argsort(steps[rows])
        s, lv = steps[rows][order], wl[rows][order]
        if (s <= 0).any() or (np.diff(s) <= 0).any() or s[-1] != end[0]:
            raise ValueError(f"run {g!r}: positions must be positive and distinct, and the last must be its end "
                             f"position {end[0]:g} (its final checkpoint), got {s.tolist()}.")
        if len(s) < 2:
            raise ValueError(f"run {g!r} has only its final checkpoint; a trajectory needs one before it too.")
        runs.append({"position": (s / end[0]).tolist(), "weighted_loss": lv.tolist()})
    if len(runs) < 2:
        raise ValueError(f"a trajectory prior needs at least 2 complete runs (it is calibrated by leaving one out), "
                         f"got {len(runs)}.")
    cal: dict[str, list[float]] = {"position": [], "trend_sq_error": [], "prior_sq_error": []}
    for i, run in enumerate(runs):
        pos, lv = np.asarray(run["position"]), np.asarray(run["weighted_loss"])
        for k in range(MIN_POINTS, len(pos)):
            drops = _prior_drops(pos[:k], lv[:k], runs[:i] + runs[i + 1 :])
            if not len(drops):
                continue
            cal["position"].append(float(pos[k - 1]))
            cal["trend_sq_error"].append(float((_trend_forecast(pos[:k], lv[:k], 1.0) - lv[-1]) ** 2))
            cal["prior_sq_error"].append(float((lv[k - 1] - np.median(drops) - lv[-1]) ** 2))
    return {"runs": runs, "calibration": cal}


def with_prior(vector: SalienceVector, prior: dict) -> SalienceVector:
    """A copy of ``vector`` whose ``fit_report`` carries ``prior`` (from :func:`trajectory_prior`), saved with it."""
    _check_prior(prior)
    return replace(vector, fit_report={**vector.fit_report, PRIOR_KEY: prior})


def forecast_score(
    x: Any, weighted_losses: Any, x_end: Any, vector: SalienceVector, level: float = 0.8, prior: dict | None = None
) -> tuple[float, float, float]:
    """``(pred, lo, hi)``: the score forecast at ``x_end`` and its interval at ``level``.

    Args:
        x: ``[n]`` training positions (steps or tokens) of the run's validations, positive and increasing,
            ``n >= MIN_POINTS``.
        weighted_losses: ``[n]`` the vector's weighted loss at each.
        x_end: where the run ends, beyond ``x[-1]``, in ``x``'s unit.
        vector: maps the weighted loss to a score; its ``fit_report["trajectory_prior"]`` is used unless
            ``prior`` is given.
        level: the interval's coverage, in (0, 1).
        prior: a :func:`trajectory_prior` dict, overriding the vector's.

    A vector without stored residuals has no link interval: ``lo`` and ``hi`` are then NaN (warned once per vector,
    as :meth:`~csv_callback.SalienceVector.interval` does), ``pred`` is still the forecast.

    Without a prior the own trend alone forecasts, and its uncertainty is taken to be as large as the move it
    forecasts past the last validation (a power law fitted early misses a decaying schedule's late drop by
    that order). See the module docstring for the combination.
    """
    x, wl, x_end = _check_history(x, weighted_losses, x_end)
    if not isinstance(vector, SalienceVector):
        raise ValueError(f"vector must be a SalienceVector, got {type(vector).__name__}.")
    level = check_level(level)
    prior = vector.fit_report.get(PRIOR_KEY) if prior is None else prior
    m_t = _trend_forecast(x, wl, x_end)
    pos = x / x_end
    drops = np.empty(0)
    if prior is not None:
        _check_prior(prior)
        drops = _prior_drops(pos, wl, prior["runs"])
    if len(drops):
        m_p = float(wl[-1] - np.median(drops))
        cal = prior["calibration"]
        cp = np.asarray(cal["position"])
        kern = np.exp(-0.5 * (np.log(cp / pos[-1]) / _KERNEL_WIDTH) ** 2) if len(cp) else cp
        if kern.sum() > 1e-12:
            v_t = float(np.average(cal["trend_sq_error"], weights=kern))
            v_p = float(np.average(cal["prior_sq_error"], weights=kern))
        else:  # no fitting run was cut near this position: both as uncertain as their disagreement says
            v_t = v_p = (m_t - m_p) ** 2
        v_t, v_p = max(v_t, 1e-12), max(v_p, 1e-12)
        w_t = v_p / (v_t + v_p)
        mean = w_t * m_t + (1 - w_t) * m_p
        var = v_t * v_p / (v_t + v_p) + w_t * (1 - w_t) * (m_t - m_p) ** 2
    else:
        if prior is not None:
            warnings.warn(f"no run of the trajectory prior was observed as early as x / x_end = {pos[-1]:.3g}; "
                          "forecasting from the run's own trend alone.", RuntimeWarning, stacklevel=2)
        mean, var, m_p = m_t, (m_t - wl[-1]) ** 2, m_t
    half = float(norm.ppf(0.5 + level / 2) * math.sqrt(var))
    # The calibration can trust one estimate almost entirely (the mixture term then vanishes), yet it was measured
    # on the fitting runs only: the interval spans both estimates whatever their weights.
    return vector.score_interval(mean, min(mean - half, m_t, m_p), max(mean + half, m_t, m_p), level)


def running_forecast(
    x: Any, weighted_losses: Any, x_end: Any, vector: SalienceVector, level: float = 0.8
) -> tuple[float, float, float]:
    """``(forecast, lo, hi)``: what a run reports at its latest validation about its score at ``x_end``, the
    ``csv/<task>/forecast`` the callbacks log and ``csv-callback forecast`` prints.

    Args:
        x: ``[n]`` training positions (steps or tokens) of the run's validations so far, strictly increasing; the
            last is the latest. Positions <= 0 (before training) are no history to forecast from.
        weighted_losses: ``[n]`` the vector's weighted loss at each; NaN where it could not be computed (such a
            validation is no history either).
        x_end: where the run ends, a positive number in ``x``'s unit.
        vector, level: as for :func:`forecast_score`.

    The rules, in order: a latest weighted loss that is not finite gives NaN for all three; at or after ``x_end``,
    the prediction now and its interval; with fewer than ``MIN_POINTS`` validations at ``x > 0`` with a finite
    loss, the prediction now and everything the link can give (nothing is known yet about the end); else
    :func:`forecast_score`. A bound the vector cannot give (no stored residuals) is the end of its link's range
    (within its score range), so all three are finite for a finite latest loss: a monitor can watch them.
    """
    try:
        x = np.asarray(x, dtype=np.float64)
        wl = np.asarray(weighted_losses, dtype=np.float64)
    except (TypeError, ValueError) as e:  # strings, ragged input
        raise ValueError(f"x and weighted_losses must be 1-D arrays of numbers ({e}).") from None
    if x.ndim != 1 or wl.shape != x.shape or not len(x):
        raise ValueError(f"x and weighted_losses must be 1-D and of one length >= 1 (one position and loss per "
                         f"validation so far), got shapes {x.shape} and {wl.shape}.")
    if not np.isfinite(x).all() or (np.diff(x) <= 0).any():
        raise ValueError(f"x must be finite and strictly increasing (the positions of successive validations), got "
                         f"{x.tolist()[:10]}.")
    if not isinstance(x_end, (int, float, np.integer, np.floating)) or isinstance(x_end, bool) \
            or not math.isfinite(float(x_end)) or not float(x_end) > 0:
        raise ValueError(f"x_end must be a positive finite number, the position where the run ends, got {x_end!r}.")
    if not isinstance(vector, SalienceVector):
        raise ValueError(f"vector must be a SalienceVector, got {type(vector).__name__}.")
    level = check_level(level)
    if not math.isfinite(wl[-1]):
        return math.nan, math.nan, math.nan
    pred = float(vector.link(wl[-1]))
    if x[-1] >= x_end:
        return pred, *_or_link_range(vector, *vector.interval(wl[-1], level))
    seen = (x > 0) & np.isfinite(wl)
    if seen.sum() < MIN_POINTS:
        return pred, *_or_link_range(vector, math.nan, math.nan)
    pred, lo, hi = forecast_score(x[seen], wl[seen], float(x_end), vector, level)
    return pred, *_or_link_range(vector, lo, hi)


def _or_link_range(vector: SalienceVector, lo: float, hi: float) -> tuple[float, float]:
    """``(lo, hi)``, each replaced by the end of what ``vector``'s link can give (within its score range) where it
    is not finite: a monitor must stay finite, and that range is what is known then."""
    a, b = vector.score_range
    low, high = min(max(vector.link.lo, a), b), min(max(vector.link.hi, a), b)
    return (float(lo) if math.isfinite(lo) else low, float(hi) if math.isfinite(hi) else high)


def _check_prior(prior: Any) -> None:
    """Raise ValueError unless ``prior`` has the shape :func:`trajectory_prior` returns."""
    fix = "build it with trajectory_prior(vector, losses, steps, groups, end_steps)"
    try:
        runs, cal = prior["runs"], prior["calibration"]
        ok = isinstance(runs, list) and len(runs) >= 1
        for run in runs:
            p = np.asarray(run["position"], dtype=np.float64)
            lv = np.asarray(run["weighted_loss"], dtype=np.float64)
            ok = ok and p.ndim == 1 and p.shape == lv.shape and len(p) >= 2 and bool(np.isfinite(p).all())
            ok = ok and bool(np.isfinite(lv).all()) and p[0] > 0 and bool((np.diff(p) > 0).all()) and p[-1] == 1.0
        cols = [np.asarray(cal[k], dtype=np.float64) for k in ("position", "trend_sq_error", "prior_sq_error")]
        ok = ok and all(c.ndim == 1 and c.shape == cols[0].shape and np.isfinite(c).all() for c in cols)
        ok = ok and bool((cols[0] > 0).all() and (cols[1] >= 0).all() and (cols[2] >= 0).all())
    except (TypeError, KeyError, IndexError, ValueError):  # not a dict, a missing key, a non-number
        ok = False
    if not ok:
        raise ValueError(f"trajectory prior must be a dict of 'runs' (each 'position' x / x_end positive, increasing "
                         f"to 1, and 'weighted_loss', >= 2 finite numbers each) and 'calibration' (lists 'position', "
                         f"'trend_sq_error', 'prior_sq_error' of finite numbers); {fix}.")
