"""Prediction intervals: SalienceVector.predict_interval, the residuals fit_salience stores for it, and the
pred_lo/pred_hi metrics of both adapters (a real Lightning Trainer, a real transformers.Trainer)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning_helpers as H
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from csv_callback import SalienceVector, SigmoidLink, fit_salience
from csv_callback.callback import SalienceCallback
from csv_callback.evaluator import SalienceEvaluator
from csv_callback.salience import conformal_quantile
from csv_callback.testing import synthetic_ladder

SHARES_FIT = (0.05, 0.15, 0.35, 0.6)
SHARES_NEW = (0.1, 0.25, 0.45)  # mixtures between the fitted ones: the same world, new runs


def _fit(seed: int, noise: float = 0.03) -> SalienceVector:
    lad = synthetic_ladder(n_tokens=600, n_salient=20, shares=SHARES_FIT, checkpoints_per_mixture=12,
                           score_noise=noise, seed=seed)
    return fit_salience(lad.losses, lad.scores, groups=lad.groups, task="t")


@pytest.fixture(scope="module")
def fitted() -> list[tuple[SalienceVector, object]]:
    """Per world seed: a vector fitted on 4 mixtures, and 3 new mixtures of the same world (same tokens, same
    score curve, fresh loss and score noise) to test its intervals on."""
    out = []
    for seed in range(4):
        new = synthetic_ladder(n_tokens=600, n_salient=20, shares=SHARES_NEW, checkpoints_per_mixture=12,
                               score_noise=0.03, seed=seed)
        out.append((_fit(seed), new))
    return out


def test_coverage_on_new_mixtures_with_known_noise(fitted):
    """Score noise 0.03 (sd) dominates the error: the 80% and 95% intervals cover about that share of new points."""
    for level, (low, high) in ((0.8, (0.7, 0.93)), (0.95, (0.88, 1.0))):
        covered, widths = [], []
        for sv, new in fitted:
            lo, hi = sv.predict_interval(new.losses, level)
            covered += ((new.scores >= lo) & (new.scores <= hi)).tolist()
            widths += (hi - lo).tolist()
        assert low <= np.mean(covered) <= high, (level, np.mean(covered))
        # Not the whole score range: a Gaussian noise of 0.03 gives 2 x 1.28 x 0.03 = 0.077 at 80%.
        assert np.median(widths) < (0.2 if level == 0.8 else 0.3)


def test_shapes_match_predict_and_levels_nest(fitted):
    sv, new = fitted[0]
    for losses in (new.losses, new.losses[0]):
        pred = sv.predict(losses)
        lo, hi = sv.predict_interval(losses)
        assert np.shape(lo) == np.shape(hi) == np.shape(pred) and type(lo) is type(pred)
    prev_lo, prev_hi = sv.predict_interval(new.losses, 0.5)
    for level in (0.6, 0.8, 0.9, 0.95):
        lo, hi = sv.predict_interval(new.losses, level)
        assert (lo <= prev_lo).all() and (hi >= prev_hi).all()
        prev_lo, prev_hi = lo, hi
    pred = sv.predict(new.losses)
    assert (prev_lo <= pred).all() and (pred <= prev_hi).all()


def test_the_stored_residuals_are_the_honest_held_out_errors(fitted):
    sv, _ = fitted[0]
    rep = sv.fit_report
    r = rep["interval"]["abs_residuals"]
    assert r == sorted(abs(p - y) for p, y in zip(rep["cv_pred"]["csv"], rep["scores"]))
    # Within the fitted range the half-width is the ceil((m + 1) * level)-th smallest residual.
    wl = np.mean(sv.loss_range)
    lo, hi = sv.interval(wl, 0.8)
    k = math.ceil((len(r) + 1) * 0.8)
    assert (hi - lo) / 2 == pytest.approx(r[k - 1]) or lo == 0.0 or hi == 1.0


def test_too_few_checkpoints_for_the_level_give_the_whole_score_range():
    assert conformal_quantile([0.1, 0.2, 0.3], 0.75) == 0.3  # ceil(4 * 0.75) = 3
    assert conformal_quantile([0.1, 0.2, 0.3], 0.8) == math.inf
    v = SalienceVector(weights=np.full(4, 0.25), link=SigmoidLink(0.2, 0.9, 2.0, 2.0), loss_range=(1.0, 3.0),
                       fit_report={"interval": {"method": "split-conformal", "abs_residuals": [0.1, 0.2, 0.3]}})
    assert v.predict_interval(np.full(4, 2.0), 0.9) == (0.0, 1.0)
    unbounded = SalienceVector(**{**v.__dict__, "metric": "logprob", "score_range": (-math.inf, math.inf)})
    assert unbounded.predict_interval(np.full(4, 2.0), 0.9) == (-math.inf, math.inf)


def test_widens_outside_the_fitted_loss_range():
    """Beyond the range the side towards the data ends where the interval at the range's end does; the far side
    adds the link's own move beyond the range again."""
    link = SigmoidLink(0.2, 0.9, 2.0, 2.0)
    v = SalienceVector(weights=np.full(4, 0.25), link=link, loss_range=(1.5, 2.5),
                       fit_report={"interval": {"method": "split-conformal", "abs_residuals": [0.01] * 9 + [0.02]}})
    q = 0.01  # ceil(11 * 0.8) = 9th smallest
    inside = v.interval(2.0, 0.8)
    assert inside == pytest.approx((float(link(2.0)) - q, float(link(2.0)) + q))
    for wl, edge in ((1.0, 1.5), (3.2, 2.5)):
        lo, hi = v.interval(wl, 0.8)
        d = abs(float(link(wl)) - float(link(edge)))
        assert hi - lo == pytest.approx(2 * (q + d)) and d > 0.05
        at_edge = v.interval(edge, 0.8)
        # Lower loss than seen: at least the score at the range's end; higher: at most.
        assert (lo if wl < edge else hi) == pytest.approx(at_edge[0] if wl < edge else at_edge[1])
    widths = [np.subtract(*v.interval(wl, 0.8)[::-1]) for wl in (1.5, 1.2, 0.9, 0.6)]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    assert all(math.isnan(x) for x in v.interval(float("nan"), 0.8))


@pytest.mark.parametrize("level", [0, 1, 1.5, -0.2, float("nan"), "0.8", True, None])
def test_bad_level_rejected(level):
    v = H.plain_vector(H.make_probe())
    with pytest.raises(ValueError, match="level must be a number strictly between 0 and 1"):
        v.predict_interval(np.ones(v.n_tokens), level)
    with pytest.raises(ValueError, match=r"interval_level=\.\.\.\) must be a number strictly between 0 and 1"):
        SalienceEvaluator([v], H.make_probe(), interval_level=level)
    with pytest.raises(ValueError, match=r"interval_level=\.\.\.\) must be a number strictly between 0 and 1"):
        SalienceCallback(v, H.make_probe(), interval_level=level)


@pytest.mark.parametrize("bad", [[], [0.2, 0.1], [-0.1], [float("inf")], "x", {"abs_residuals": [0.1]}])
def test_malformed_stored_residuals_are_refused(bad):
    report = {"interval": bad if isinstance(bad, dict) else {"method": "split-conformal", "abs_residuals": bad}}
    with pytest.raises(ValueError, match=r"fit_report\['interval'\]"):
        SalienceVector(weights=np.full(4, 0.25), link=SigmoidLink(0.2, 0.9, 2.0, 2.0), fit_report=report)


def _old_files(tmp_path: Path) -> list[Path]:
    """A format-2 file saved before intervals existed (no residuals in its report) and a format-1 file."""
    v = SalienceVector(weights=np.full(4, 0.25), link=SigmoidLink(0.2, 0.9, 2.0, 2.0), loss_range=(1.5, 2.5),
                       fit_report={"cv_mse": {"csv": 1e-3}})
    v.save(tmp_path / "v2.safetensors")
    meta = {"link": {"lo": 0.2, "hi": 0.9, "k": 2.0, "L0": 2.0}, "task": "t", "metric": "acc",
            "probe_fingerprint": "", "tokenizer_hash": "", "loss_range": [1.5, 2.5], "fit_report": {}}
    save_file({"weights": torch.from_numpy(v.weights)}, str(tmp_path / "v1.safetensors"),
              metadata={"format": "csv_callback.salience/1", "json": json.dumps(meta)})
    return [tmp_path / "v2.safetensors", tmp_path / "v1.safetensors"]


def test_vectors_saved_before_intervals_load_with_nan_and_one_warning(tmp_path):
    for path in _old_files(tmp_path):
        old = SalienceVector.load(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lo, hi = old.predict_interval(np.full((3, 4), 2.0))
            old.predict_interval(np.full(4, 2.0), 0.95)
            old.interval(2.0)
        assert [(w.category, "stores no held-out residuals" in str(w.message)) for w in caught] == [
            (RuntimeWarning, True)]
        assert np.isnan(lo).all() and np.isnan(hi).all() and lo.shape == (3,)
        assert old.predict(np.full(4, 2.0)) == pytest.approx(0.55)


def test_fitted_vector_round_trips_its_intervals(fitted, tmp_path):
    sv, new = fitted[0]
    sv.save(tmp_path / "v.safetensors")
    back = SalienceVector.load(tmp_path / "v.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(back.predict_interval(new.losses), sv.predict_interval(new.losses))


def test_fit_is_unchanged_by_the_stored_residuals():
    """The residuals are read off the fit's cross-validation after it: weights, link and errors as before."""
    lad = synthetic_ladder(n_tokens=300, n_salient=10, checkpoints_per_mixture=6, seed=5)
    a = fit_salience(lad.losses, lad.scores, groups=lad.groups)
    report = {k: v for k, v in a.fit_report.items() if k != "interval"}
    assert set(a.fit_report) - set(report) == {"interval"}
    b = fit_salience(lad.losses, lad.scores, groups=lad.groups)
    assert np.array_equal(a.weights, b.weights) and a.link == b.link


# ---------------------------------------------------------------------- the adapters
def test_lightning_trainer_logs_the_interval(tmp_path):
    probe = H.make_probe()
    vector = H.fitted_vector(probe)
    cb = SalienceCallback(vector, probe, model_attr="model", interval_level=0.9)
    module = H.TinyLM()
    H.trainer(tmp_path, [cb], max_steps=4, val_every=2).fit(module, *H.loaders())
    logs = tmp_path / "csv/version_0"
    pred = H.read_csv_metrics(logs, "csv/nexttok/pred")
    lo, hi = (H.read_csv_metrics(logs, f"csv/nexttok/pred_{s}") for s in ("lo", "hi"))
    assert sorted(lo) == sorted(hi) == sorted(pred) == [1, 3]
    for step in pred:
        assert lo[step] <= pred[step] <= hi[step] and lo[step] < hi[step]
    wl = [r["weighted_loss"] for r in cb.history]
    expect = vector.interval(np.array(wl), 0.9)
    assert [r["pred_lo"] for r in cb.history] == pytest.approx(expect[0].tolist())
    assert [lo[1], lo[3]] == pytest.approx(expect[0].tolist(), abs=1e-6)
    assert [hi[1], hi[3]] == pytest.approx(expect[1].tolist(), abs=1e-6)
    summaries = cb.evaluator.metric_summaries()
    assert summaries["csv/nexttok/pred_lo"] == summaries["csv/nexttok/pred_hi"] == "max"


def test_hf_trainer_adds_the_interval(tmp_path, model, tokenizer):
    from transformers import Trainer, TrainingArguments

    from csv_callback import ProbeSet
    from csv_callback.hf import SalienceTrainerCallback

    probe = ProbeSet.from_texts(["def f(x): return x", "import os"], tokenizer, max_length=32)
    v = SalienceVector(weights=np.full(probe.n_tokens, 1 / probe.n_tokens), link=SigmoidLink(0.25, 0.9, 1.5, 6.5),
                       task="t", probe_fingerprint=probe.fingerprint, tokenizer_hash=probe.tokenizer_hash,
                       loss_range=(5.0, 8.0),
                       fit_report={"interval": {"method": "split-conformal", "abs_residuals": [0.02] * 20}})
    ids = tokenizer("\n".join(["x = 1", "def g(): pass"] * 40))["input_ids"]
    blocks = [{"input_ids": torch.tensor(ids[i:i + 16]), "labels": torch.tensor(ids[i:i + 16])}
              for i in range(0, 16 * 8, 16)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True)
    cb = SalienceTrainerCallback([v], probe, interval_level=0.8)
    trainer = Trainer(model=model, args=args, train_dataset=blocks, eval_dataset=blocks[:4], callbacks=[cb])
    trainer.train()
    metrics = trainer.evaluate()
    pred, lo, hi = (metrics[f"eval_csv/t/{k}"] for k in ("pred", "pred_lo", "pred_hi"))
    assert (lo, hi) == pytest.approx(v.interval(metrics["eval_csv/t/weighted_loss"], 0.8))
    assert lo <= pred <= hi



def test_cli_predict_prints_the_interval_in_json(store, probe, tmp_path, capsys):
    """The conftest store: three checkpoints whose losses are all 1, 2 and 3; the vector was fitted on 1.5-2.5."""
    from csv_callback.cli import main

    v = SalienceVector(weights=np.full(probe.n_tokens, 1 / probe.n_tokens), link=SigmoidLink(0.2, 0.9, 2.0, 2.0),
                       probe_fingerprint=probe.fingerprint, loss_range=(1.5, 2.5),
                       fit_report={"interval": {"method": "split-conformal", "abs_residuals": [0.02] * 30}})
    v.save(tmp_path / "v.safetensors")
    args = ["predict", str(store.root), str(tmp_path / "v.safetensors")]
    assert main([*args, "--json", "--level", "0.9"]) == 0
    records = json.loads(capsys.readouterr().out)
    lo, hi = v.interval(np.array([1.0, 2.0, 3.0]), 0.9)
    assert [r["pred_lo"] for r in records] == pytest.approx(lo.tolist())
    assert [r["pred_hi"] for r in records] == pytest.approx(hi.tolist())
    assert main([*args, "--level", "1.5"]) == 2
    assert "--level must be a number strictly between 0 and 1" in capsys.readouterr().err


def test_a_vector_without_residuals_logs_nan_metrics_and_none_in_the_history(tmp_path):
    """Metrics stay floats (NaN) for the loggers; the history, saved in checkpoints as JSON, holds None; the W&B
    table takes such rows next to ones with an interval."""
    import os

    import wandb
    from csv_callback import wandb_view

    probe = H.make_probe()
    plain = H.plain_vector(probe, "with")
    bare = SalienceVector(**{**plain.__dict__, "task": "without", "fit_report": {}})
    evaluator = SalienceEvaluator([plain, bare], probe)
    model = H.TinyLM().model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):
            metrics = evaluator.evaluate(model, step, training=True).metrics
    assert len([w for w in caught if "stores no held-out residuals" in str(w.message)]) == 1
    assert math.isnan(metrics["csv/without/pred_lo"]) and math.isnan(metrics["csv/without/pred_hi"])
    assert metrics["csv/with/pred_lo"] < metrics["csv/with/pred"] < metrics["csv/with/pred_hi"]
    rows = {(r["step"], r["task"]): r for r in evaluator.history}
    assert rows[2, "without"]["pred_lo"] is None and rows[2, "with"]["pred_lo"] == metrics["csv/with/pred_lo"]
    state = json.loads(json.dumps(evaluator.state_dict(), allow_nan=False))
    again = SalienceEvaluator([plain, bare], probe)
    again.load_state_dict(state)
    assert again.history == evaluator.history
    os.environ["WANDB_MODE"] = "offline"
    run = wandb.init(dir=str(tmp_path), project="intervals")
    try:
        wandb_view.log_predictions_table(run, evaluator, step=2)
    finally:
        run.finish()
    (table,) = Path(run.dir).glob("media/table/csv/predictions_*.table.json")
    data = json.loads(table.read_text())["data"]
    assert [(r[1], r[6] is None) for r in data] == [("with", False), ("without", True)] * 2
