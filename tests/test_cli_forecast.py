"""`csv-callback forecast` (the end-of-run forecast of a stored run, as the callbacks log it live) and
`csv-callback fit --trajectory-prior`, on real loss stores, real vectors and a real evaluator run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from offline_helpers import one_torch_thread

from csv_callback import ProbeSet, SalienceVector, fit_salience
from csv_callback.cli import main
from csv_callback.evaluator import SalienceEvaluator
from csv_callback.forecast import MIN_POINTS, PRIOR_KEY, forecast_score
from csv_callback.store import LossStore
from csv_callback.testing import synthetic_ladder

FIT_STEPS = (10, 20, 40, 80, 160, 320)  # each fitting run's evaluations; the last is its end
END = 12  # the evaluated run's planned end


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def run_probe(tokenizer, corpus) -> ProbeSet:
    return ProbeSet.from_texts([" ".join(corpus[k][:300].split()) for k in (3, 7, 11)], tokenizer, 32)


@pytest.fixture(scope="module")
def fitting_runs(tmp_path_factory, run_probe):
    """One store per data mixture (a complete run each, evaluated at FIT_STEPS, saved as the callbacks name their
    evaluations) and a scores CSV; the losses are the synthetic ladder's, raised to a tiny GPT-2's scale."""
    root = tmp_path_factory.mktemp("fitting")
    lad = synthetic_ladder(n_tokens=run_probe.n_tokens, n_salient=3, checkpoints_per_mixture=len(FIT_STEPS), seed=3)
    rows = ["checkpoint,score,mix"]
    for i, (losses, score, mix) in enumerate(zip(lad.losses, lad.scores, lad.groups)):
        step = FIT_STEPS[i % len(FIT_STEPS)]
        LossStore(root / "runs" / mix, run_probe).write(f"step-{step:09d}", losses + 3.0, step=step)
        rows.append(f"{mix}/step-{step:09d},{float(score)!r},{mix}")
    (root / "scores.csv").write_text("\n".join(rows) + "\n")
    return sorted((root / "runs").iterdir()), root / "scores.csv"


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory, fitting_runs):
    stores, csv = fitting_runs
    out = tmp_path_factory.mktemp("vec") / "t.safetensors"
    assert main(["fit", *map(str, stores), "--task", "t", "--scores", str(csv), "--groups", "col:mix", "--out",
                 str(out), "--trajectory-prior"]) == 0
    return out


def forecast_json(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert main(["forecast", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def link_range(sv: SalienceVector) -> tuple[float, float]:
    a, b = sv.score_range
    return min(max(sv.link.lo, a), b), min(max(sv.link.hi, a), b)


def errors(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------- fit --trajectory-prior
def test_fit_trajectory_prior_stores_the_prior_of_every_run(fitting_runs, vector_file, capsys):
    sv = SalienceVector.load(vector_file)
    prior = sv.fit_report[PRIOR_KEY]
    assert len(prior["runs"]) == len(fitting_runs[0])
    assert all(run["position"] == [s / FIT_STEPS[-1] for s in FIT_STEPS] for run in prior["runs"])
    assert prior["calibration"]["position"]  # each run cut at its checkpoints, forecast by the others


def test_fit_trajectory_prior_refuses_a_single_store(fitting_runs, tmp_path, capsys):
    stores, csv = fitting_runs
    out = tmp_path / "v.safetensors"
    err = errors(capsys, "fit", str(stores[0]), "--task", "t", "--scores", str(csv), "--out", str(out),
                 "--trajectory-prior")
    assert "--trajectory-prior learns how runs move to their end from several complete runs: pass at least two" in err
    assert not out.exists()


# ---------------------------------------------------------------------- forecast
def test_offline_forecast_is_what_the_evaluator_logged_live(vector_file, run_probe, model, tokenizer, corpus, tmp_path,
                                                            capsys):
    """A real run: a tiny GPT-2 trained between evaluations at steps 0, 2, ..., END, its evaluator forecasting the
    score at END; the offline forecast on its save_dir reproduces every logged forecast at steps > 0."""
    save_dir = tmp_path / "run"
    evaluator = SalienceEvaluator([vector_file], run_probe, save_dir=save_dir)
    batch = tokenizer([" ".join(corpus[k][:200].split()) for k in (3, 7)], return_tensors="pt", padding=True,
                      truncation=True, max_length=32)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(END + 1):
        if step % 2 == 0:
            model.eval()
            evaluator.evaluate(model, step, training=True, end_step=END)
        model.train()
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    live = [r for r in evaluator.history if r["step"] > 0]
    records = forecast_json(capsys, str(save_dir), str(vector_file), "--end", str(END))
    assert [r["step"] for r in records] == [r["step"] for r in live] == list(range(2, END + 1, 2))
    for got, want in zip(records, live):
        assert got["checkpoint"] == want["name"] and got["end_step"] == END and got["task"] == "t"
        for key in ("pred", "weighted_loss", "forecast", "forecast_lo", "forecast_hi"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (got["step"], key)
    assert len({r["forecast"] for r in records}) > 2  # the losses moved, so did the forecast


def test_rows_follow_the_link_range_rule_then_forecast_score(vector_file, run_probe, tmp_path, capsys):
    """A store holding a step-0 evaluation, an evaluation outside training and one past the end besides the training
    evaluations: rows for the training evaluations only, each by the live rules."""
    sv = SalienceVector.load(vector_file)
    rng = np.random.default_rng(0)
    base = rng.uniform(4.0, 7.0, run_probe.n_tokens).astype(np.float32)
    store = LossStore(tmp_path / "run", run_probe)
    steps = [2, 4, 6, 8, 10, 12, 14]
    for s in [0, *steps]:
        store.write(f"step-{s:09d}", base * (1.0 + 0.6 / math.sqrt(s + 1)), step=s)
    store.write("eval-best-step-000000006", base, step=6)
    records = forecast_json(capsys, str(store.root), str(vector_file), "--end", str(END))
    assert [r["step"] for r in records] == steps
    wl = np.array([r["weighted_loss"] for r in records])
    low, high = link_range(sv)
    for k, r in enumerate(records, start=1):
        pred = float(sv.link(wl[k - 1]))
        assert r["pred"] == pytest.approx(pred, rel=1e-12)
        if r["step"] >= END:  # at or after the end: the prediction now and its interval
            want = (pred, *sv.interval(wl[k - 1], 0.8))
        elif k < MIN_POINTS:  # nothing known yet about the end
            want = (pred, low, high)
        else:
            want = forecast_score(steps[:k], wl[:k], END, sv, 0.8)
        assert (r["forecast"], r["forecast_lo"], r["forecast_hi"]) == pytest.approx(want, rel=1e-12)
    assert records[2]["forecast"] != records[2]["pred"]
    # The table shows the same numbers, one row per training evaluation.
    assert main(["forecast", str(store.root), str(vector_file), "--end", str(END), "--level", "0.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"score at step {END} forecast") and "0.5 interval" in out[0]
    rows = [ln.split() for ln in out[2:]]
    assert [int(r[1]) for r in rows] == steps
    half = forecast_json(capsys, str(store.root), str(vector_file), "--end", str(END), "--level", "0.5")
    assert [float(x) for x in rows[3][2:]] == pytest.approx(
        [half[3][k] for k in ("forecast", "pred", "forecast_lo", "forecast_hi")], abs=1e-4)


def test_a_vector_without_prior_or_interval_gets_a_note_and_finite_bounds(run_probe, tmp_path, capsys):
    rng = np.random.default_rng(1)
    X = rng.uniform(4.0, 7.0, (12, run_probe.n_tokens))
    sv = fit_salience(X, 1 / (1 + np.exp(X.mean(1) - 5.5)), probe=run_probe, task="bare")
    sv.fit_report.pop("interval")
    sv.save(tmp_path / "bare.safetensors")
    store = LossStore(tmp_path / "run", run_probe)
    for s in (1, 2, 3, 4):
        store.write(f"step-{s:09d}", X[s] / (1 + 0.05 * s), step=s)
    capsys.readouterr()
    assert main(["forecast", str(store.root), str(tmp_path / "bare.safetensors"), "--end", "4", "--json"]) == 0
    got = capsys.readouterr()
    assert "carries no trajectory prior" in got.err and "fit it with --trajectory-prior" in got.err
    records = json.loads(got.out)
    assert all(r["forecast_lo"] is not None and r["forecast_hi"] is not None for r in records)
    assert (records[-1]["forecast_lo"], records[-1]["forecast_hi"]) == link_range(sv)  # at the end, no interval


def test_bad_input_is_refused_with_the_fix(vector_file, run_probe, tokenizer, tmp_path, capsys):
    good = LossStore(tmp_path / "good", run_probe)
    for s in (2, 4, 6):
        good.write(f"step-{s:09d}", np.full(run_probe.n_tokens, 6.0 - 0.1 * s, np.float32), step=s)
    v = str(vector_file)

    def fails(store, *extra: str) -> str:
        return errors(capsys, "forecast", str(store), *extra)

    assert "--end must be a positive training step" in fails(good.root, v, "--end", "0")
    assert "beyond the run's first evaluation (step 2)" in fails(good.root, v, "--end", "2")
    assert "vector " + v + " is given twice" in fails(good.root, v, v, "--end", "9")
    assert "--level must be a number strictly between 0 and 1" in fails(good.root, v, "--end", "9", "--level", "1")
    assert "no such" in fails(good.root, str(tmp_path / "missing.safetensors"), "--end", "9").lower()

    unknown = LossStore(tmp_path / "unknown", run_probe)
    unknown.write("step-000000005", np.ones(run_probe.n_tokens, np.float32))  # no step recorded
    assert "record no training step (-1)" in fails(unknown.root, v, "--end", "9")

    collected = LossStore(tmp_path / "collected", run_probe)
    collected.write("runA/checkpoint-5", np.ones(run_probe.n_tokens, np.float32), step=5)
    assert "holds no training evaluations (checkpoints named step-<N> at steps > 0" in fails(collected.root, v,
                                                                                              "--end", "9")

    other = ProbeSet.from_texts(["Another probe altogether, of other tokens."], tokenizer, 16)
    elsewhere = LossStore(tmp_path / "elsewhere", other)
    for s in (2, 4, 6):
        elsewhere.write(f"step-{s:09d}", np.ones(other.n_tokens, np.float32), step=s)
    assert run_probe.fingerprint in fails(elsewhere.root, v, "--end", "9")
