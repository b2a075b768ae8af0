"""SalienceTrainerCallback's W&B extras with a real transformers.Trainer reporting to a real offline W&B run,
read back from the run's files: the predictions table and the salience view."""

from __future__ import annotations

import html
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from offline_helpers import one_torch_thread
from transformers import Trainer, TrainingArguments

from csv_callback import ProbeSet, SalienceVector, SigmoidLink
from csv_callback.hf import SalienceTrainerCallback

wandb = pytest.importorskip("wandb")
TASK = "pydoc"


@pytest.fixture(scope="module")
def hf_wandb_run(tmp_path_factory, tokenizer, corpus):
    tmp = tmp_path_factory.mktemp("hf_wandb")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(tmp))
    mp.setenv("WANDB_PROJECT", "csv-callback-tests")
    wandb.finish()  # HF's WandbCallback would log into a run left active instead of starting its own
    from csv_callback.testing import tiny_gpt2

    ids = tokenizer("\n".join(corpus[:40]))["input_ids"]
    blocks = [ids[i * 32 : (i + 1) * 32] for i in range(72)]
    train = [{"input_ids": b, "labels": b} for b in blocks[:64]]
    evals = [{"input_ids": b, "labels": b} for b in blocks[64:]]
    probe = ProbeSet.from_texts([t[:300] for t in corpus[40:44]], tokenizer, max_length=48)
    w = np.random.default_rng(0).random(probe.n_tokens)
    vector = SalienceVector(weights=w / w.sum(), link=SigmoidLink(0.25, 0.9, 1.5, 6.5), task=TASK,
                            probe_fingerprint=probe.fingerprint, tokenizer_hash=probe.tokenizer_hash,
                            loss_range=(5.0, 8.0))
    cb = SalienceTrainerCallback([vector], probe)
    args = TrainingArguments(output_dir=str(tmp / "out"), max_steps=4, per_device_train_batch_size=8,
                             per_device_eval_batch_size=8, learning_rate=3e-3, eval_strategy="steps", eval_steps=2,
                             save_strategy="no", logging_steps=2, report_to="wandb", use_cpu=True, seed=0,
                             disable_tqdm=True)
    trainer = cb.attach(Trainer(model=tiny_gpt2(len(tokenizer)), args=args, train_dataset=train, eval_dataset=evals,
                                processing_class=tokenizer))
    try:
        with one_torch_thread():
            trainer.train()
            trainer.evaluate()  # after training, of the same weights: the step's evaluation again, logged again
        run_dir = Path(wandb.run.dir).parent  # .../offline-run-<date>-<id>/files
    finally:
        wandb.finish()
        mp.undo()
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return cb, vector, probe, tokenizer, run_dir, records


def test_hf_run_holds_the_predictions_table_and_one_salience_view(hf_wandb_run):
    cb, vector, probe, tokenizer, run_dir, records = hf_wandb_run
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    # WandbCallback logs eval_csv/... as eval/csv/..., against train/global_step.
    pred = f"eval/csv/{TASK}/pred"
    logged = [(row["train/global_step"], row[pred]) for row in rows if pred in row]
    preds = [r["pred"] for r in cb.history]
    assert logged == [(2, pytest.approx(preds[0], abs=1e-9)), (4, pytest.approx(preds[1], abs=1e-9)),
                      (4, pytest.approx(preds[1], abs=1e-9))]
    # One table per evaluation, in the row WandbCallback logs that evaluation's scalars in.
    tables = [row for row in rows if "csv/predictions.path" in row]
    assert len(tables) == 3 and all(f"eval/csv/{TASK}/pred" in row for row in tables)
    last = json.loads((run_dir / "files" / tables[-1]["csv/predictions.path"]).read_text())
    assert last["columns"] == ["step", "task", "pred", "weighted_loss", "extrapolating", "name", "pred_lo", "pred_hi",
                               "forecast", "forecast_lo", "forecast_hi"]
    assert [(row[0], row[5]) for row in last["data"]] == [(2, "step-000000002"), (4, "step-000000004")]
    assert {row[5]: row[2] for row in last["data"]} == {r["name"]: pytest.approx(r["pred"]) for r in cb.history}
    views = [row[f"csv/{TASK}/salience.path"] for row in rows if f"csv/{TASK}/salience.path" in row]
    assert len(views) == 1
    page = (run_dir / "files" / views[0]).read_text()
    # The report's renderer: decoded text (the Trainer's tokenizer), the largest weight in the darkest shade.
    assert "most salient tokens" in page and "Tokens are shown as [ids]" not in page
    assert "rgba(192,57,43,0.70)" in page
    top_token = probe.scored_token_ids()[int(vector.weights.argmax())]
    assert html.escape(tokenizer.decode([int(top_token)])) in page
