"""csv_callback.scaling: the step-1 law L(N, D), its interval, and the score it implies through a vector's link.

Synthetic ladders shaped like the OLMo ladder's (4 sizes x 4 data budgets, 16 runs); the real ladder is in
tests/test_olmo_scaling.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from csv_callback import SalienceVector
from csv_callback.salience import INTERVAL_KEY, INTERVAL_METHOD, SigmoidLink
from csv_callback.scaling import ScalingLaw, fit_scaling_law, predict_score

PLANTED = {"E": 0.5, "A": 40.0, "alpha": 0.23, "B": 100.0, "beta": 0.24}
SIZES = np.array([1.9e8, 3.7e8, 7.6e8, 1.28e9])
N = np.repeat(SIZES, 4)
D = N * 20 * np.tile([1, 2, 5, 10], 4)  # 1, 2, 5 and 10 x Chinchilla, as the ladder's runs
TARGET = (1.3e10, 5e12)  # a 13B model at 5T tokens: far outside the ladder


def planted(n, d):
    p = PLANTED
    return p["E"] + p["A"] / np.asarray(n) ** p["alpha"] + p["B"] / np.asarray(d) ** p["beta"]


def test_recovers_a_planted_law():
    law = fit_scaling_law(N, D, planted(N, D))
    for name, value in PLANTED.items():
        assert getattr(law, name) == pytest.approx(value, rel=1e-3), name
    assert law.predict(*TARGET) == pytest.approx(planted(*TARGET), rel=1e-6)
    assert law.n_points == 16 and law.log_residual_std < 1e-6
    # Exact data: the interval is no wider than rounding, and it contains the truth.
    lo, hi = law.interval(*TARGET)
    assert lo <= planted(*TARGET) * (1 + 1e-6) and hi >= planted(*TARGET) * (1 - 1e-6)
    assert hi / lo < 1.001


def test_predict_broadcasts_and_returns_floats_for_scalars():
    law = fit_scaling_law(N, D, planted(N, D))
    assert isinstance(law.predict(1e9, 1e11), float)
    grid = law.predict(SIZES[:, None], np.array([1e10, 1e11, 1e12]))  # [4, 1] x [3] -> [4, 3]
    assert grid.shape == (4, 3)
    np.testing.assert_allclose(grid, planted(SIZES[:, None], np.array([1e10, 1e11, 1e12])), rtol=1e-6)
    lo, hi = law.interval(SIZES, D[::4])
    assert lo.shape == hi.shape == (4,) and (lo <= law.predict(SIZES, D[::4])).all()


def test_interval_covers_fresh_runs_at_about_its_level():
    # Log-normal noise of 1% on every run's loss (the OLMo ladder's step-1 residual spread is 0.4-2%): over many
    # ladders, a fresh run's loss falls inside the 80% interval about 80% of the time, inside the ladder's range
    # and at the far target alike. Loose bounds: 60 draws and the Huber fit's covariance is an approximation.
    rng = np.random.default_rng(0)
    sd, draws = 0.01, 60
    inside = {"ladder": (5e8, 5e10), "target": TARGET}
    hits = dict.fromkeys(inside, 0)
    widths = []
    for _ in range(draws):
        law = fit_scaling_law(N, D, planted(N, D) * np.exp(rng.normal(0, sd, len(N))))
        for where, (n, d) in inside.items():
            lo, hi = law.interval(n, d, level=0.8)
            hits[where] += lo <= planted(n, d) * math.exp(rng.normal(0, sd)) <= hi
        lo90, hi90 = law.interval(*TARGET, level=0.9)
        lo80, hi80 = law.interval(*TARGET, level=0.8)
        widths.append((hi90 - lo90) / (hi80 - lo80))
    for where, hit in hits.items():
        assert 0.6 <= hit / draws <= 0.97, (where, hit / draws)
    assert min(widths) > 1.0  # a higher level, a wider interval


def test_a_law_round_trips_through_json_and_refuses_bad_parameters():
    law = fit_scaling_law(N, D, planted(N, D) * np.exp(np.random.default_rng(1).normal(0, 0.01, len(N))))
    back = ScalingLaw.from_dict(json.loads(json.dumps(law.to_dict())))
    assert back == law and back.interval(*TARGET) == law.interval(*TARGET)
    with pytest.raises(ValueError, match=">= 0"):
        ScalingLaw.from_dict({**law.to_dict(), "alpha": -0.1})
    with pytest.raises(ValueError, match="5 x 5"):
        ScalingLaw.from_dict({**law.to_dict(), "covariance": [[0.0]]})


@pytest.mark.parametrize(("params", "tokens", "losses", "message"), [
    (N[:-1], D, planted(N, D), "one value per point"),
    (N[:4], D[:4], planted(N[:4], D[:4]), "at least 5 points"),
    (N * 0, D, planted(N, D), "positive"),
    (N, -D, planted(N, D), "positive"),
    (N, D, planted(N, D) - 10, "positive"),
    (np.full(16, 1e9), D, planted(1e9, D), "two model sizes"),
    (N, np.full(16, 1e10), planted(N, 1e10), "two token counts"),
    (N.reshape(4, 4), D, planted(N, D), "params"),
    (N, D, np.where(N > 1e9, np.nan, planted(N, D)), "losses"),
])
def test_fit_refuses_bad_input(params, tokens, losses, message):
    with pytest.raises(ValueError, match=message):
        fit_scaling_law(params, tokens, losses)


@pytest.mark.parametrize("delta", [0, -1e-3, "1e-3", math.nan])
def test_fit_refuses_a_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        fit_scaling_law(N, D, planted(N, D), delta=delta)


def test_predict_and_interval_refuse_bad_targets():
    law = fit_scaling_law(N, D, planted(N, D))
    for n, d in ((0.0, 1e12), (1e9, -1.0), (math.nan, 1e12), (1e9, math.inf)):
        with pytest.raises(ValueError, match="positive and finite"):
            law.predict(n, d)
        with pytest.raises(ValueError, match="positive and finite"):
            law.interval(n, d)
    with pytest.raises(ValueError, match="level"):
        law.interval(*TARGET, level=1.5)


def _vector(residuals: list[float] | None) -> SalienceVector:
    report = {} if residuals is None else {INTERVAL_KEY: {"method": INTERVAL_METHOD, "abs_residuals": residuals}}
    return SalienceVector(np.ones(1), SigmoidLink(0.25, 1.0, 3.0, 2.0), task="t", domains=("loss",),
                          loss_range=(2.2, 3.5), fit_report=report)


def test_predict_score_goes_through_the_link_and_widens_both_intervals():
    rng = np.random.default_rng(2)
    law = fit_scaling_law(N, D, planted(N, D) * np.exp(rng.normal(0, 0.01, len(N))))
    vector = _vector(sorted(rng.uniform(0, 0.03, 40).tolist()))
    for n, d in ((7.6e8, 1.5e10), TARGET):  # inside the link's fitted loss range, and extrapolating beyond it
        loss = law.predict(n, d)
        pred, lo, hi = predict_score(law, vector, n, d, level=0.8)
        assert pred == pytest.approx(vector.link(loss), abs=1e-12)
        link_lo, link_hi = vector.interval(loss, 0.8)
        loss_lo, loss_hi = law.interval(n, d, 0.8)
        # Combined in quadrature: the score interval holds the link's interval and the law's, mapped through the
        # (decreasing) link, and is no wider than their sum.
        assert lo <= min(link_lo, vector.link(loss_hi)) + 1e-12 and hi >= max(link_hi, vector.link(loss_lo)) - 1e-12
        assert lo >= link_lo - (pred - vector.link(loss_hi)) - 1e-12
        assert hi <= link_hi + (vector.link(loss_lo) - pred) + 1e-12
        assert 0.0 <= lo < pred < hi <= 1.0


def test_predict_score_without_residuals_gives_nan_bounds():
    law = fit_scaling_law(N, D, planted(N, D))
    with pytest.warns(RuntimeWarning, match="no held-out residuals"):
        pred, lo, hi = predict_score(law, _vector(None), *TARGET)
    assert math.isfinite(pred) and math.isnan(lo) and math.isnan(hi)


def test_predict_score_refuses_other_objects():
    law = fit_scaling_law(N, D, planted(N, D))
    with pytest.raises(ValueError, match="ScalingLaw and a SalienceVector"):
        predict_score(law, SigmoidLink(0.25, 1.0, 3.0, 2.0), *TARGET)
    with pytest.raises(ValueError, match="ScalingLaw and a SalienceVector"):
        predict_score(law.to_dict(), _vector(None), *TARGET)
