"""csv_callback.forecast: end-of-run score forecasts from a run's history and its vector's fitting runs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from csv_callback import SalienceVector
from csv_callback.forecast import MIN_POINTS, forecast_score, trajectory_prior, with_prior
from csv_callback.salience import INTERVAL_KEY, INTERVAL_METHOD, SigmoidLink

END = 2000
STEPS = np.array([10, 19, 38, 73, 141, 274, 532, 1031, 2000], dtype=np.float64)  # the ladder's checkpoints


def lr(step: np.ndarray) -> np.ndarray:
    """Linear warm-up over 30 steps, then cosine decay to a tenth at END (the ladder's schedule)."""
    warm = (step + 1) / 30
    cos = 0.1 + 0.45 * (1 + np.cos(np.pi * np.clip((step - 30) / (END - 30), 0, 1)))
    return np.where(step < 30, warm, cos)


def trajectory(amplitude: float, floor: float = 2.0) -> np.ndarray:
    """Weighted loss ``[9]`` at STEPS: a power law in the learning-rate sum plus an annealing term (the form of
    Tissue et al. 2024), so the loss keeps falling near the end faster than a power law in steps says."""
    rates = lr(np.arange(END, dtype=np.float64))
    s1 = np.cumsum(rates)[STEPS.astype(int) - 1]
    s2 = np.array([np.sum(1.0 - rates[30:int(s)]) if s > 30 else 0.0 for s in STEPS])
    return floor + amplitude * ((s1 / 100) ** -0.5 - 2e-4 * s2)


def vector(k: float = 3.0, L0: float = 2.5) -> SalienceVector:
    """Two tokens weighed equally (the tests pass both tokens the same loss), residuals of 0.01 for the link."""
    report = {INTERVAL_KEY: {"method": INTERVAL_METHOD, "abs_residuals": [0.01] * 20}}
    return SalienceVector(np.array([0.5, 0.5]), SigmoidLink(0.0, 1.0, k, L0), fit_report=report)


def fitting_runs(amplitudes=(0.8, 1.0, 1.3, 1.6, 2.0)):
    """(losses [m, 2], steps [m], groups [m], end_steps [m]) of complete runs with these amplitudes."""
    L = np.concatenate([trajectory(a) for a in amplitudes])
    return (np.repeat(L[:, None], 2, 1), np.tile(STEPS, len(amplitudes)),
            np.repeat(np.arange(len(amplitudes)), len(STEPS)), np.full(len(L), float(END)))


def test_prior_forecasts_a_decaying_schedule_better_than_own_trend_and_now():
    sv = vector()
    prior = trajectory_prior(sv, *fitting_runs())
    truth = trajectory(1.15)
    for k in (6, 7):  # the checkpoints up to 25% and 50% of the steps
        pred, lo, hi = forecast_score(STEPS[:k], truth[:k], END, sv, 0.8, prior)
        alone, *_ = forecast_score(STEPS[:k], truth[:k], END, sv)
        target, now = float(sv.link(truth[-1])), float(sv.link(truth[k - 1]))
        assert abs(pred - target) < 0.2 * abs(now - target)
        assert abs(pred - target) < abs(alone - target)
        assert lo <= target <= hi and lo <= pred <= hi


def test_prior_travels_with_the_vector_file(tmp_path):
    sv = vector()
    prior = trajectory_prior(sv, *fitting_runs())
    with_p = with_prior(sv, prior)
    with_p.save(tmp_path / "v.safetensors")
    loaded = SalienceVector.load(tmp_path / "v.safetensors")
    truth = trajectory(1.15)
    assert forecast_score(STEPS[:6], truth[:6], END, loaded) == forecast_score(STEPS[:6], truth[:6], END, sv, 0.8,
                                                                               prior)
    assert INTERVAL_KEY in loaded.fit_report  # the vector's own report is kept


def test_interval_widens_when_own_trend_and_prior_disagree():
    sv = vector(k=0.5, L0=2.5)  # nearly linear over these losses, so widths compare like loss widths
    prior = trajectory_prior(sv, *fitting_runs())
    truth = trajectory(1.15)
    far = copy.deepcopy(prior)
    for run in far["runs"]:  # every fitting run now fell three times as far after 25% of its steps
        lv = np.asarray(run["weighted_loss"])
        late = np.asarray(run["position"]) > 0.25
        lv[late] = lv[5] + 3 * (lv[late] - lv[5])
        run["weighted_loss"] = lv.tolist()
    _, lo, hi = forecast_score(STEPS[:6], truth[:6], END, sv, 0.8, prior)
    _, lo_far, hi_far = forecast_score(STEPS[:6], truth[:6], END, sv, 0.8, far)
    assert hi_far - lo_far > 1.5 * (hi - lo)


def test_interval_is_nested_in_level():
    sv = vector()
    prior = trajectory_prior(sv, *fitting_runs())
    truth = trajectory(1.15)
    (_, lo8, hi8), (_, lo95, hi95) = (forecast_score(STEPS[:6], truth[:6], END, sv, lv, prior) for lv in (0.8, 0.95))
    assert lo95 <= lo8 < hi8 < hi95  # the low end can be the own trend itself, at every level


def test_without_a_prior_the_own_trend_forecasts_with_an_interval_around_it():
    sv = vector()
    truth = trajectory(1.0)
    pred, lo, hi = forecast_score(STEPS[:6], truth[:6], END, sv)
    assert lo < pred < hi and pred > float(sv.link(truth[5]))  # the loss keeps falling, the score keeps rising


def test_prior_runs_that_start_later_than_the_cut_are_skipped_with_a_warning():
    sv = vector()
    losses, steps, groups, ends = fitting_runs()
    late = steps >= 141
    prior = trajectory_prior(sv, losses[late], steps[late], groups[late], ends[late])
    truth = trajectory(1.0)
    with pytest.warns(RuntimeWarning, match="own trend alone"):
        pred, _, _ = forecast_score(STEPS[:3], truth[:3], END, sv, 0.8, prior)
    assert math.isfinite(pred)


@pytest.mark.parametrize(("x", "wl", "x_end", "match"), [
    (STEPS[:5], trajectory(1.0)[:4], END, "same length"),
    (STEPS[:2], trajectory(1.0)[:2], END, f"at least {MIN_POINTS} validations"),
    (STEPS[[0, 2, 1, 3]], trajectory(1.0)[:4], END, "strictly increasing"),
    (np.array([0.0, 1, 2, 3]), trajectory(1.0)[:4], END, "positive"),
    (STEPS[:4], np.array([3.0, np.nan, 2.5, 2.4]), END, "non-finite"),
    (STEPS[:4], np.array([[3.0, 2.9, 2.5, 2.4]]), END, "dimension"),
    (STEPS[:4], trajectory(1.0)[:4], 73.0, "beyond the last position"),
    (STEPS[:4], trajectory(1.0)[:4], math.inf, "beyond the last position"),
    (STEPS[:4], trajectory(1.0)[:4], "2000", "beyond the last position"),
])
def test_forecast_validates_its_history(x, wl, x_end, match):
    with pytest.raises(ValueError, match=match):
        forecast_score(x, wl, x_end, vector())


def test_forecast_validates_vector_level_and_prior():
    truth = trajectory(1.0)
    with pytest.raises(ValueError, match="SalienceVector"):
        forecast_score(STEPS[:4], truth[:4], END, "vector")
    with pytest.raises(ValueError, match="between 0 and 1"):
        forecast_score(STEPS[:4], truth[:4], END, vector(), level=1.0)
    with pytest.raises(ValueError, match="trajectory prior"):
        forecast_score(STEPS[:4], truth[:4], END, vector(), prior={"runs": [{"position": [0.5, 0.9]}]})
    good = trajectory_prior(vector(), *fitting_runs())
    for broken in ({**good, "calibration": {**good["calibration"], "trend_sq_error": ["a"] * 30}},
                   {**good, "runs": [{"position": [0.5, 0.9], "weighted_loss": [3.0, 2.0]}]},  # does not end at 1
                   {**good, "runs": [{"position": [0.5, 1.0], "weighted_loss": [3.0, math.nan]}]}, "prior"):
        with pytest.raises(ValueError, match="trajectory prior"):
            forecast_score(STEPS[:4], truth[:4], END, vector(), prior=broken)
        with pytest.raises(ValueError, match="trajectory prior"):
            with_prior(vector(), broken)


def test_a_vector_without_residuals_forecasts_with_nan_bounds():
    sv = SalienceVector(np.array([0.5, 0.5]), SigmoidLink(0.0, 1.0, 3.0, 2.5))
    truth = trajectory(1.0)
    with pytest.warns(RuntimeWarning, match="no held-out residuals"):
        pred, lo, hi = forecast_score(STEPS[:6], truth[:6], END, sv, 0.8, trajectory_prior(sv, *fitting_runs()))
    assert math.isfinite(pred) and math.isnan(lo) and math.isnan(hi)


def test_trajectory_prior_validates_its_runs():
    sv = vector()
    losses, steps, groups, ends = fitting_runs()
    with pytest.raises(ValueError, match="final checkpoint"):
        trajectory_prior(sv, losses[:-1], steps[:-1], groups[:-1], ends[:-1])
    with pytest.raises(ValueError, match="at least 2 complete runs"):
        trajectory_prior(sv, losses[:9], steps[:9], groups[:9], ends[:9])
    with pytest.raises(ValueError, match="same checkpoints"):
        trajectory_prior(sv, losses, steps[:-1], groups, ends)
    with pytest.raises(ValueError, match="several end positions"):
        trajectory_prior(sv, losses, steps, groups, np.where(np.arange(len(ends)) == 0, 1000.0, ends))
