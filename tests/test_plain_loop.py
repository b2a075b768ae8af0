"""Any training loop: examples/plain_pytorch.py run for real (a few steps) into an offline W&B run, read back;
the W&B extras' input checks; and W&B staying an optional import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from offline_helpers import subprocess_env

from csv_callback import SalienceEvaluator, SalienceVector, wandb_view

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "examples" / "assets"
TASKS = ["ladder_arith", "ladder_facts", "ladder_pattern"]


def _records(run_dir: Path) -> list[dict]:
    # `wandb leet inspect` reads the offline run's transaction log with no network and no account.
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, list[dict], str]:
    out = tmp_path_factory.mktemp("plain")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "plain_pytorch.py"), "--steps", "6", "--eval-every",
                           "4", "--out", str(out)], capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    return run_dir, _records(run_dir), proc.stdout


def test_plain_loop_logs_the_predictions_at_each_evaluation_step(plain_run):
    _, records, stdout = plain_run
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    # Evaluations at every 4th step and the last one, each at the loop's own step, next to its training loss.
    evaluated = [row for row in rows if "csv/ladder_facts/pred" in row]
    assert [row["_step"] for row in evaluated] == [4, 6]
    for row in evaluated:
        assert "train/loss" in row and row["csv/nonfinite_losses"] == 0
        for task in TASKS:
            assert 0.0 <= row[f"csv/{task}/pred"] <= 1.0 and row[f"csv/{task}/weighted_loss"] > 0
    assert [row["_step"] for row in rows if "train/loss" in row] == [1, 2, 3, 4, 5, 6]
    # The loop printed what it logged.
    assert f"step 6: predicted ladder_arith {evaluated[-1]['csv/ladder_arith/pred']:.3f}" in stdout
    # Summaries of the evaluator's metrics, against W&B's own step (the one wandb.log(..., step=) sets).
    defs = {r["metric"]["name"]: r["metric"] for r in records if r["type"] == "metric" and "name" in r["metric"]}
    assert defs["csv/ladder_facts/pred"]["summary"] == {"max": True}
    assert defs["csv/probe_mean_loss"]["summary"] == {"min": True}
    assert "step_metric" not in defs["csv/ladder_facts/pred"]


def test_plain_loop_logs_the_whole_table_and_the_salience_views(plain_run):
    run_dir, records, _ = plain_run
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    tables = [row for row in rows if "csv/predictions.path" in row]
    assert [row["_step"] for row in tables] == [4, 6]  # in the row of each evaluation's scalars
    last = json.loads((run_dir / "files" / tables[-1]["csv/predictions.path"]).read_text())
    assert last["columns"] == wandb_view.TABLE_COLUMNS
    by_key = {(row[0], row[1]): row for row in last["data"]}
    assert sorted(by_key) == [(s, t) for s in (4, 6) for t in TASKS]
    for row in rows:
        if "csv/ladder_facts/pred" in row:
            for task in TASKS:
                assert by_key[row["_step"], task][2] == pytest.approx(row[f"csv/{task}/pred"], abs=1e-9)
                assert by_key[row["_step"], task][5] == f"step-{row['_step']:09d}"
    # One salience view per vector, logged once before training, as decoded text with the legible darkest shade.
    for task in TASKS:
        views = [row for row in rows if f"csv/{task}/salience.path" in row]
        assert [row["_step"] for row in views] == [0]
        page = (run_dir / "files" / views[0][f"csv/{task}/salience.path"]).read_text()
        assert f"<b>{task}</b>: the 8 of 211 probe sequences with the most salient tokens" in page
        assert "rgba(192,57,43,0.70)" in page and "Tokens are shown as [ids]" not in page


def test_wandb_extras_say_what_they_take():
    evaluator = SalienceEvaluator(ASSETS / "ladder_facts.safetensors", ASSETS / "probe.safetensors")
    with pytest.raises(ValueError, match=r"takes W&B runs .*wandb.init\(\).*got \['str'\]"):
        wandb_view.define_metrics("my-run", evaluator)
    with pytest.raises(ValueError, match="takes a SalienceEvaluator, got SalienceVector"):
        wandb_view.log_predictions_table([], SalienceVector.load(ASSETS / "ladder_facts.safetensors"))
    with pytest.raises(ValueError, match=r"step=...\) must be None or a step number >= 0 .*got -1"):
        wandb_view.log_salience_views([], evaluator, step=-1)


def test_wandb_is_imported_only_by_what_logs_to_it():
    # With wandb made unimportable, the package, its evaluator and both adapters still import.
    code = ("import sys; sys.modules['wandb'] = None\n"
            "import csv_callback, csv_callback.evaluator, csv_callback.hf, csv_callback.callback\n"
            "import csv_callback.wandb_view\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_evaluate_opens_the_store_itself_and_warns_inside_training_when_it_cannot(tmp_path, model, tokenizer):
    from csv_callback import ProbeSet, RunMismatchError
    from csv_callback.store import LossStore, load_losses

    probe = ProbeSet.from_texts(["A probe text for the evaluator's own store."], tokenizer, 32)
    evaluator = SalienceEvaluator(None, probe, save_dir=tmp_path / "mine")
    evaluator.evaluate(model, 2, training=True)  # no open_store(): the losses are saved all the same
    assert load_losses(tmp_path / "mine").names == ["step-000000002"]
    LossStore(tmp_path / "other", probe, run_id="another-run").write("a", np.ones(probe.n_tokens, np.float32), step=1)
    inside = SalienceEvaluator(None, probe, save_dir=tmp_path / "other")
    with pytest.warns(RuntimeWarning, match=r"could not open the loss store .*another-run.*training continues"):
        metrics = inside.evaluate(model, 2, training=True).metrics
    assert np.isfinite(metrics["csv/probe_mean_loss"]) and load_losses(tmp_path / "other").names == ["a"]
    with pytest.raises(RunMismatchError, match="another-run"):
        SalienceEvaluator(None, probe, save_dir=tmp_path / "other").evaluate(model, 2)
