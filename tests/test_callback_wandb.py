"""SalienceCallback with a real WandbLogger in offline mode, read back from the run's .wandb log."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import lightning_helpers as H
import pytest
from lightning.pytorch.loggers import WandbLogger

from csv_callback.callback import SalienceCallback


def _inspect(run_dir: str, *args: str) -> str:
    # `wandb leet inspect` reads the offline run's transaction log with no network and no account.
    return subprocess.run(["wandb", "leet", "inspect", *args, run_dir], capture_output=True, text=True, check=True,
                          timeout=120).stdout


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    probe = H.make_probe()
    vector = H.plain_vector(probe)
    cb = SalienceCallback(vector, probe)
    logger = WandbLogger(save_dir=str(tmp), offline=True, project="csv-callback-test")
    t = H.trainer(tmp, [cb], max_steps=6, val_every=2, logger=logger, enable_checkpointing=False)
    t.fit(H.TinyLM(), *H.loaders())
    run_dir = str(Path(logger.experiment.dir).parent)
    logger.experiment.finish()
    records = [json.loads(line) for line in _inspect(run_dir, "--json").splitlines() if line.strip()]
    summary = json.loads(_inspect(run_dir, "--summary", "--json"))
    return cb, vector, probe, run_dir, records, summary


def test_predictions_reach_wandb_against_global_step_with_max_summary(wandb_run):
    cb, _, _, _, records, summary = wandb_run
    preds = [r["pred"] for r in cb.history]
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    logged = [(row["trainer/global_step"], row["csv/plumb/pred"]) for row in rows if "csv/plumb/pred" in row]
    # One point per validation (none for the sanity check), at Lightning's validation step (global_step - 1).
    assert [s for s, _ in logged] == [1, 3, 5]
    assert [p for _, p in logged] == pytest.approx(preds, abs=1e-6)

    defs = {r["metric"].get("name"): r["metric"] for r in records if r["type"] == "metric"}
    for name, summ in [("csv/plumb/pred", "max"), ("csv/plumb/weighted_loss", "min"), ("csv/probe_mean_loss", "min")]:
        assert defs[name]["step_metric"] == "trainer/global_step" and defs[name]["summary"] == {summ: True}
    assert summary["summary"]["csv/plumb/pred"] == {"max": pytest.approx(max(preds), abs=1e-6)}
    wls = [r["weighted_loss"] for r in cb.history]
    assert summary["summary"]["csv/plumb/weighted_loss"] == {"min": pytest.approx(min(wls), abs=1e-5)}
    assert summary["state"] == "finished"


def test_predictions_table_holds_the_whole_series(wandb_run):
    cb, _, _, run_dir, records, _ = wandb_run
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    tables = [row for row in rows if "csv/predictions.path" in row]
    assert len(tables) == 3  # one per validation, each sharing the row of that validation's scalars
    assert all("csv/plumb/pred" in row for row in tables)
    last = json.loads((Path(run_dir) / "files" / tables[-1]["csv/predictions.path"]).read_text())
    assert last["columns"] == ["step", "task", "pred", "weighted_loss", "extrapolating", "name", "pred_lo", "pred_hi",
                               "forecast", "forecast_lo", "forecast_hi"]
    assert [row[0] for row in last["data"]] == [2, 4, 6]
    assert [row[5] for row in last["data"]] == ["step-000000002", "step-000000004", "step-000000006"]
    assert [row[2] for row in last["data"]] == pytest.approx([r["pred"] for r in cb.history])


def test_salience_view_logged_once_with_the_most_salient_tokens(wandb_run):
    _, vector, probe, run_dir, records, _ = wandb_run
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    views = [row["csv/plumb/salience.path"] for row in rows if "csv/plumb/salience.path" in row]
    assert len(views) == 1
    page = (Path(run_dir) / "files" / views[0]).read_text()
    # Every scored token of the shown sequences carries its weight; the largest weight has the darkest shade,
    # the report's, which keeps the text legible.
    shown = [float(w) for w in re.findall(r'title="w=([0-9.e-]+)"', page)]
    assert shown and max(shown) == pytest.approx(vector.weights.max(), rel=1e-3)
    assert "rgba(192,57,43,0.70)" in page
    top_token = probe.scored_token_ids()[int(vector.weights.argmax())]
    assert H.tokenizer().decode([int(top_token)]).strip()[:3] in page


def test_resumed_run_continues_the_wandb_series(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    probe = H.make_probe()
    vector = H.plain_vector(probe)

    def run(extra: list, ckpt_path=None) -> str:
        logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="csv-callback-test")
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        t = H.trainer(tmp_path, [SalienceCallback(vector, probe), ckpt, *extra], max_steps=12, val_every=2,
                      logger=logger)
        try:
            t.fit(H.TinyLM(), *H.loaders(n_train=48), ckpt_path=ckpt_path)
        finally:
            run_dir = str(Path(logger.experiment.dir).parent)
            logger.experiment.finish()
        return run_dir

    with pytest.raises(RuntimeError, match="node lost"):
        run([H.CrashAt(7)])  # dies in step 8, after the checkpoint of the validation at step 6
    (first,) = Path(tmp_path, "wandb").glob("offline-run-*")
    second = run([], ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    def series(run_dir) -> tuple[list[int], list[dict]]:
        records = [json.loads(x) for x in _inspect(str(run_dir), "--json").splitlines() if x.strip()]
        rows = [r["history"]["item"] for r in records if r["type"] == "history"]
        return [row["trainer/global_step"] for row in rows if "csv/plumb/pred" in row], rows

    steps1, _ = series(first)
    steps2, rows2 = series(second)
    assert steps1 == [1, 3, 5] and steps2 == [7, 9, 11]  # together: every validation once
    # The resumed run's table carries the whole series, the steps from before the crash included.
    table = json.loads((Path(second) / "files" / [r for r in rows2 if "csv/predictions.path" in r][-1]
                        ["csv/predictions.path"]).read_text())
    assert [row[0] for row in table["data"]] == [2, 4, 6, 8, 10, 12]
