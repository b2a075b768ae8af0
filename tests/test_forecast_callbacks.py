"""The live end-of-run forecast (``csv/<task>/forecast``, ``forecast_lo``, ``forecast_hi``) with real Trainers.

Every run trains the tiny GPT-2 of adapter_drivers.py / lightning_helpers.py for real, with a real Lightning Trainer
or a real ``transformers.Trainer``, validating every 2 steps. What the tests hold the callbacks to (the rules of
:class:`~csv_callback.evaluator.SalienceEvaluator`):

- the forecast metrics are there from the first validation, finite, so a stock ``EarlyStopping`` (``strict=True``,
  ``check_finite=True``) can monitor them at once;
- for the first two validations the forecast is the prediction now and its interval the link's whole range;
- from the third, :func:`~csv_callback.forecast.forecast_score` on the run's history (its steps and weighted losses)
  at the run's planned end, or at ``forecast_step``; at or after that end, the prediction now and its interval;
- a bound the vector cannot give (no stored residuals) is the end of the link's range, never NaN.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import lightning.pytorch as pl
import lightning_helpers as H
import numpy as np
import pytest
from adapter_drivers import DRIVERS
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from offline_helpers import one_torch_thread

from csv_callback import ProbeSet, SalienceVector
from csv_callback.callback import SalienceCallback
from csv_callback.forecast import MIN_POINTS, PRIOR_KEY, forecast_score, trajectory_prior, with_prior

TASK = "plumb"
KINDS = ("forecast", "forecast_lo", "forecast_hi")
LINK_RANGE = (0.0, 1.0)  # H.plain_vector's link: lo=0, hi=1, within its score range (0, 1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(params=sorted(DRIVERS))
def driver(request):
    return DRIVERS[request.param]()


@pytest.fixture(scope="module")
def probe() -> ProbeSet:
    return H.make_probe()


def own_trend_vector(probe: ProbeSet) -> SalienceVector:
    """Held-out residuals (a finite interval), no trajectory prior: the run's own trend alone forecasts."""
    return H.plain_vector(probe, TASK)


def prior_vector(probe: ProbeSet) -> SalienceVector:
    """The own-trend vector carrying the trajectory prior of three complete synthetic runs of 8 checkpoints.

    Every token of a checkpoint has the same loss, so the weighted loss (weights summing to 1) is that loss; the runs
    fall from about the tiny GPT-2's first losses (~6) with the late, faster drop of a decaying schedule."""
    vector = own_trend_vector(probe)
    steps = np.arange(1, 9, dtype=np.float64)
    runs = [5.2 + a * ((steps / 8) ** -0.25 - 0.3 * steps / 8) for a in (0.5, 0.7, 0.9)]
    losses = np.repeat(np.concatenate(runs)[:, None], probe.n_tokens, axis=1)
    groups = np.repeat(np.arange(len(runs)), len(steps))
    prior = trajectory_prior(vector, losses, np.tile(steps, len(runs)), groups, np.full(len(losses), 8.0))
    return with_prior(vector, prior)


def no_residuals_vector(probe: ProbeSet) -> SalienceVector:
    """No stored residuals: no prediction interval, and no link interval for the forecast."""
    return replace(own_trend_vector(probe), fit_report={})


VECTORS = {"prior": prior_vector, "own_trend": own_trend_vector, "no_residuals": no_residuals_vector}


def expected_forecast(vector: SalienceVector, history: list[dict], end: float) -> tuple[float, float, float]:
    """``forecast_score`` on the steps and weighted losses of ``history`` (a run's rows up to a validation, at least
    MIN_POINTS of them and before ``end``), its bounds the link's range where the vector has no interval."""
    assert len(history) >= MIN_POINTS and history[-1]["step"] < end
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-residuals vector's "no interval" warning
        pred, lo, hi = forecast_score([r["step"] for r in history], [r["weighted_loss"] for r in history], end,
                                      vector, 0.8)
    return pred, lo if math.isfinite(lo) else LINK_RANGE[0], hi if math.isfinite(hi) else LINK_RANGE[1]


def now(row: dict) -> tuple[float, float, float]:
    """The prediction now and its interval (the link's range where the vector has none): the forecast at the end."""
    return (row["pred"], LINK_RANGE[0] if row["pred_lo"] is None else row["pred_lo"],
            LINK_RANGE[1] if row["pred_hi"] is None else row["pred_hi"])


def logged(metrics: dict[str, float]) -> tuple[float, float, float]:
    return tuple(metrics[f"csv/{TASK}/{k}"] for k in KINDS)


def saved(row: dict) -> tuple[float, float, float]:
    return tuple(row[k] for k in KINDS)


def check_series(run, vector: SalienceVector, end: float) -> None:
    """Every validation of ``run`` logged and kept the forecast the rules give for the run's end ``end``."""
    history = run.history
    assert sorted(run.metrics) == [r["step"] for r in history]
    for i, row in enumerate(history):
        if row["step"] >= end:
            want = now(row)
        elif i < MIN_POINTS - 1:
            want = (row["pred"], *LINK_RANGE)
        else:
            want = expected_forecast(vector, history[: i + 1], end)
        # Lightning hands its loggers float32 values; the history keeps the float64 ones.
        assert logged(run.metrics[row["step"]]) == pytest.approx(want, abs=1e-6), row["step"]
        assert saved(row) == pytest.approx(want, rel=1e-9, abs=1e-12), row["step"]
        assert all(math.isfinite(v) for v in want)


# ---------------------------------------------------------------------- the rules, in both frameworks
@pytest.mark.parametrize("kind", sorted(VECTORS))
def test_forecast_is_logged_from_the_first_evaluation_and_forecast_from_the_third(driver, probe, kind, tmp_path):
    vector = VECTORS[kind](probe)
    run = driver.train(tmp_path, driver.make(vector, probe), steps=8)
    assert [r["step"] for r in run.history] == [2, 4, 6, 8]
    check_series(run, vector, end=8)  # max_steps, Lightning's estimated_stepping_batches and HF's state.max_steps
    at6 = saved(run.history[2])
    assert at6[0] != run.history[2]["pred"]  # a forecast, not the prediction now
    if kind == "prior":  # the prior the vector carries moved the forecast away from the own trend's
        own = expected_forecast(replace(vector, fit_report={k: v for k, v in vector.fit_report.items()
                                                           if k != PRIOR_KEY}), run.history[:3], 8)
        assert abs(at6[0] - own[0]) > 1e-3
    if kind == "no_residuals":  # no interval anywhere, the link's range instead, never NaN
        assert all(saved(r)[1:] == LINK_RANGE for r in run.history)
    else:
        assert LINK_RANGE[0] < at6[1] < at6[0] < at6[2] < LINK_RANGE[1]


def test_the_planned_end_of_an_epochs_only_run_is_epochs_times_batches(driver, probe, tmp_path):
    vector = own_trend_vector(probe)
    run = driver.train(tmp_path, driver.make(vector, probe), epochs=2)  # 2 epochs of 8 batches, no max_steps
    assert run.global_step == 16 and [r["step"] for r in run.history] == list(range(2, 17, 2))
    check_series(run, vector, end=16)


def test_forecast_step_overrides_the_planned_end(driver, probe, tmp_path):
    vector = own_trend_vector(probe)
    later = driver.train(tmp_path / "later", driver.make(vector, probe, forecast_step=20), steps=8)
    check_series(later, vector, end=20)  # every forecast targets step 20, also the one at the run's last step
    earlier = driver.train(tmp_path / "earlier", driver.make(vector, probe, forecast_step=4), steps=8)
    check_series(earlier, vector, end=4)
    # From step 4 on the target is reached: the forecast is the prediction and its own interval.
    assert [saved(r) == now(r) for r in earlier.history] == [False, True, True, True]


# ---------------------------------------------------------------------- Lightning: stock EarlyStopping
def fit_with_early_stopping(tmp_path, vector: SalienceVector, probe: ProbeSet,
                            threshold: float) -> tuple[pl.Trainer, EarlyStopping, SalienceCallback]:
    cb = SalienceCallback(vector, probe, model_attr="model")
    # The stock defaults strict=True (a missing monitor raises) and check_finite=True (a NaN stops) stay on.
    stop = EarlyStopping(monitor=f"csv/{TASK}/forecast_hi", mode="max", divergence_threshold=threshold,
                         patience=10**9)
    t = H.trainer(tmp_path, [cb, stop], max_steps=8, val_every=2)
    t.fit(H.TinyLM(), *H.loaders())
    return t, stop, cb


def test_early_stopping_on_forecast_hi_trains_or_stops_on_the_divergence_threshold(probe, tmp_path):
    vector = own_trend_vector(probe)

    # Below anything the vector can give: never stops, from the first validation to max_steps.
    t, stop, cb = fit_with_early_stopping(tmp_path / "trains", vector, probe, LINK_RANGE[0] - 1.0)
    assert t.global_step == 8 and not t.should_stop
    assert stop.stopping_reason == EarlyStoppingReason.NOT_STOPPED
    his = [r["forecast_hi"] for r in cb.history]
    assert [r["step"] for r in cb.history] == [2, 4, 6, 8] and all(math.isfinite(h) for h in his)
    assert his[:2] == [LINK_RANGE[1]] * 2 and his[2] < LINK_RANGE[1]
    # The loggers received the same series from the first validation.
    csv = H.read_csv_metrics(tmp_path / "trains" / "csv/version_0", f"csv/{TASK}/forecast_hi")
    assert list(csv.values()) == pytest.approx(his, abs=1e-6)

    # Above the link's top: stopped by the first validation.
    t, stop, cb = fit_with_early_stopping(tmp_path / "above", vector, probe, LINK_RANGE[1] + 0.5)
    assert t.global_step == 2 and t.should_stop
    assert stop.stopping_reason == EarlyStoppingReason.DIVERGENCE_THRESHOLD

    # Just above what forecast_hi becomes at the third validation (the same deterministic run up to there): the first
    # two, at the link's top, pass; the third stops the run.
    t, stop, cb = fit_with_early_stopping(tmp_path / "third", vector, probe, (his[2] + LINK_RANGE[1]) / 2)
    assert t.global_step == 6 < 8 and t.should_stop
    assert stop.stopping_reason == EarlyStoppingReason.DIVERGENCE_THRESHOLD
    assert [r["forecast_hi"] for r in cb.history] == pytest.approx(his[:3], abs=1e-9)


# ---------------------------------------------------------------------- Lightning: no planned end
class StopAt(pl.Callback):
    """Ends a run that has no planned end, as a user would, once ``step`` steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_run_without_a_planned_end_warns_and_forecasts_nothing_unless_given_a_step(probe, tmp_path):
    vector = own_trend_vector(probe)
    cb = SalienceCallback(vector, probe, model_attr="model")
    t = H.trainer(tmp_path, [cb, StopAt(6)], max_steps=-1, max_epochs=-1, val_every=2)
    with pytest.warns(RuntimeWarning, match="no planned end .* pass forecast_step="):
        t.fit(H.TinyLM(), *H.loaders())
    assert [r["step"] for r in cb.history] == [2, 4, 6]
    assert all(saved(r) == (None, None, None) for r in cb.history)
    assert not any("forecast" in k for k in t.callback_metrics)
    assert H.read_csv_metrics(tmp_path / "csv/version_0", f"csv/{TASK}/pred")  # the predictions were logged

    given = SalienceCallback(vector, probe, model_attr="model", forecast_step=8)
    t = H.trainer(tmp_path / "given", [given, StopAt(6)], max_steps=-1, max_epochs=-1, val_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(H.TinyLM(), *H.loaders())
    assert not [w for w in caught if "no planned end" in str(w.message)]
    assert saved(given.history[2]) == pytest.approx(expected_forecast(vector, given.history, 8), rel=1e-9)


# ---------------------------------------------------------------------- Lightning: resume
def test_a_resumed_run_forecasts_from_the_history_in_its_checkpoint(probe, tmp_path):
    vector = prior_vector(probe)
    # Dies in step 8: the last checkpoint is the validation at step 6's.
    resumed = H.crashed_then_resumed(tmp_path, lambda: SalienceCallback(vector, probe, model_attr="model"))
    straight = SalienceCallback(vector, probe, model_attr="model")
    H.trainer(tmp_path / "straight", [straight], max_steps=12, val_every=2).fit(H.TinyLM(), *H.loaders(n_train=48))

    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history] == [2, 4, 6, 8, 10, 12]
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert saved(a) == pytest.approx(saved(b), abs=1e-6), a["step"]
    # Step 8, the resumed process's first validation, forecast from the four validations, three of them restored.
    at8 = resumed.history[3]
    assert saved(at8) == pytest.approx(expected_forecast(vector, resumed.history[:4], 12), rel=1e-9)
    assert at8["forecast"] != at8["pred"]
    logged8 = H.read_csv_metrics(tmp_path / "csv/version_1", f"csv/{TASK}/forecast")
    assert list(logged8.values()) == pytest.approx([r["forecast"] for r in resumed.history[3:]], abs=1e-6)
