"""SalienceCallback with a real Lightning Trainer, a real tiny HF GPT-2 and a real CSVLogger."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import lightning_helpers as H
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from csv_callback import ProbeMismatchError, ProbeSet, token_losses
from csv_callback.callback import SalienceCallback
from csv_callback.store import LossStore, load_losses
from csv_callback.testing import train_tokenizer

LOGS = Path("csv/version_0")


@pytest.fixture(scope="module")
def probe():
    return H.make_probe()


@pytest.fixture(scope="module")
def vector(probe):
    return H.fitted_vector(probe)


@pytest.fixture(scope="module")
def long_probe():
    """A short text and a long one split into sequences of 128 tokens: twice TinyLM's context window (64)."""
    text = " ".join(H.pydoc_corpus()[20][:3000].split())
    return ProbeSet.from_texts(["Short probe text here.", text], H.tokenizer(), max_length=128)


class ShrinkContextAt(pl.Callback):
    """Once training reaches ``step``, TinyLM's GPT-2 keeps only its first ``positions`` position embeddings.

    Training on shorter blocks goes on, but longer probe sequences then fail in the embedding lookup
    (IndexError): a model that stops being able to score the probe in the middle of a run.
    """

    def __init__(self, step: int, positions: int = H.BLOCK):
        self.step, self.positions = step, positions

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            kept = pl_module.model.transformer.wpe.weight[: self.positions].detach().clone()
            pl_module.model.transformer.wpe = torch.nn.Embedding.from_pretrained(kept, freeze=False)


# ---------------------------------------------------------------------- bad input, before training
def test_constructor_rejects_bad_arguments(probe, tmp_path):
    v = H.plain_vector(probe)
    with pytest.raises(ValueError, match="batch_size"):
        SalienceCallback(v, probe, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        SalienceCallback([], probe)
    with pytest.raises(ValueError, match="share the task name"):
        SalienceCallback([v, H.plain_vector(probe, seed=1)], probe)
    with pytest.raises(ValueError, match="model_attr"):
        SalienceCallback(v, probe, model_attr="")
    with pytest.raises(ValueError, match="SalienceVector objects or paths"):
        SalienceCallback([v.weights], probe)
    other = H.make_probe(n_texts=3)
    with pytest.raises(ProbeMismatchError, match="pass the probe file shipped with the vector"):
        SalienceCallback(v, other)
    # Paths work as well as objects.
    v.save(tmp_path / "v.safetensors")
    probe.save(tmp_path / "p.safetensors")
    cb = SalienceCallback(str(tmp_path / "v.safetensors"), tmp_path / "p.safetensors")
    assert cb.vectors[0].task == "plumb" and cb.probes[0].fingerprint == probe.fingerprint


def test_tokenizer_mismatch_fails_at_setup_before_any_step(probe, tmp_path):
    module = H.TinyLM()
    module.tokenizer = train_tokenizer(H.pydoc_corpus()[:20], vocab_size=300)
    t = H.trainer(tmp_path, [SalienceCallback(H.plain_vector(probe), probe)])
    with pytest.raises(ProbeMismatchError, match="not the one this probe was built with"):
        t.fit(module, *H.loaders())
    assert t.global_step == 0


def test_model_that_cannot_score_the_probe_fails_before_training(probe, tmp_path):
    with pytest.raises(ValueError, match="model_attr='missing'"):
        H.trainer(tmp_path, [SalienceCallback(H.plain_vector(probe), probe, model_attr="missing")]).fit(
            H.TinyLM(), *H.loaders())
    # pl_module.model.transformer returns hidden states, not logits: caught by the forward check.
    t = H.trainer(tmp_path, [SalienceCallback(H.plain_vector(probe), probe, model_attr="model.transformer")])
    with pytest.raises(ValueError, match="cannot compute the probe's token losses"):
        t.fit(H.TinyLM(), *H.loaders())
    assert t.global_step == 0


def test_unwritable_save_dir_fails_at_setup(probe, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    t = H.trainer(tmp_path, [SalienceCallback(H.plain_vector(probe), probe, save_dir=tmp_path / "file" / "store")])
    with pytest.raises(ValueError, match="save_dir"):
        t.fit(H.TinyLM(), *H.loaders())


def test_save_dir_of_another_probe_fails_at_setup(probe, tmp_path):
    LossStore(tmp_path / "store", H.make_probe(n_texts=3))
    t = H.trainer(tmp_path, [SalienceCallback(H.plain_vector(probe), probe, save_dir=tmp_path / "store")])
    expected = rf"SalienceCallback\(save_dir=.*\): .* holds losses of probe \w+, not of probe {probe.fingerprint}; use"
    with pytest.raises(ProbeMismatchError, match=expected):
        t.fit(H.TinyLM(), *H.loaders())
    assert t.global_step == 0


def test_probe_longer_than_the_context_window_fails_before_training(long_probe, tmp_path):
    expected = (r"cannot compute the probe's token losses with (the LightningModule|pl_module\.model) .*the longest "
                r"sequence of probe \w+ \(128 tokens\).*rebuild the probe with a smaller max_length")
    t = H.trainer(tmp_path, [SalienceCallback(H.plain_vector(long_probe), long_probe)], max_steps=4)
    with pytest.raises(ValueError, match=expected):
        t.fit(H.TinyLM(), *H.loaders(n_train=16))
    assert t.global_step == 0
    # A lone validate() is no run to protect either; here the HF model itself is checked, config and all.
    t = H.trainer(tmp_path, [SalienceCallback(H.plain_vector(long_probe), long_probe, model_attr="model")])
    with pytest.raises(ValueError, match=expected):
        t.validate(H.TinyLM(), H.loaders()[1], verbose=False)


# ---------------------------------------------------------------------- what is logged
def test_collect_only_without_vectors(probe, tmp_path):
    """Before any vector exists, the callback only stores the losses (to fit the first vectors from)."""
    module = H.TinyLM()
    cb = SalienceCallback([], probe, save_dir=tmp_path / "store", model_attr="model")
    t = H.trainer(tmp_path, [cb], max_steps=4, val_every=2)
    t.fit(module, *H.loaders())
    table = load_losses(tmp_path / "store", probe.fingerprint)
    assert table.steps.tolist() == [2, 4] and table.losses.shape == (2, probe.n_tokens)
    np.testing.assert_allclose(table.losses[-1], token_losses(module.model, probe).numpy(), atol=1e-5)
    assert float(t.callback_metrics["csv/probe_mean_loss"]) == pytest.approx(float(table.losses[-1].mean()), abs=1e-5)
    with pytest.raises(ValueError, match="or a save_dir to only collect"):
        SalienceCallback([], probe)


def test_logs_fitted_predictions_after_every_validation_not_sanity_check(probe, vector, tmp_path):
    module = H.TinyLM()
    cb = SalienceCallback(vector, probe, save_dir=tmp_path / "store", model_attr="model")
    t = H.trainer(tmp_path, [cb], max_steps=6, val_every=2, num_sanity_val_steps=2)
    t.fit(module, *H.loaders())

    preds = H.read_csv_metrics(tmp_path / LOGS, "csv/nexttok/pred")
    # Lightning logs a validation's metrics at step global_step - 1; the sanity check logs nothing.
    assert sorted(preds) == [1, 3, 5]
    assert [r["step"] for r in cb.history] == [2, 4, 6]
    for name in ("weighted_loss", "extrapolating"):
        assert sorted(H.read_csv_metrics(tmp_path / LOGS, f"csv/nexttok/{name}")) == [1, 3, 5]
    for name in ("probe_mean_loss", "eval_seconds", "nonfinite_losses"):
        assert sorted(H.read_csv_metrics(tmp_path / LOGS, f"csv/{name}")) == [1, 3, 5]

    # The last logged values are those of the final model, recomputed here from scratch.
    losses = token_losses(module.model, probe)
    wl = vector.weighted_loss(losses)
    assert preds[5] == pytest.approx(vector.predict(losses), abs=1e-6)
    assert float(t.callback_metrics["csv/nexttok/weighted_loss"]) == pytest.approx(wl, abs=1e-5)
    assert float(t.callback_metrics["csv/probe_mean_loss"]) == pytest.approx(float(losses.mean()), abs=1e-5)
    assert float(t.callback_metrics["csv/nexttok/extrapolating"]) == float(vector.extrapolates(wl))
    assert float(t.callback_metrics["csv/eval_seconds"]) > 0

    # save_dir: one row per validation, exactly the losses the predictions came from.
    table = load_losses(tmp_path / "store", fingerprint=probe.fingerprint)
    assert table.losses.shape == (3, probe.n_tokens)
    assert table.steps.tolist() == [2, 4, 6]
    assert table.names == ["step-000000002", "step-000000004", "step-000000006"]
    assert table.tokens_seen.tolist() == [2 * 8 * H.BLOCK, 4 * 8 * H.BLOCK, 6 * 8 * H.BLOCK]
    np.testing.assert_allclose(table.losses[-1], losses.numpy(), atol=1e-6)
    assert vector.predict(table.losses) == pytest.approx([r["pred"] for r in cb.history], abs=1e-6)

    # trainer.validate() evaluates again and replaces the row of the same step instead of duplicating it.
    t.validate(module, H.loaders()[1], verbose=False)
    assert [r["step"] for r in cb.history] == [2, 4, 6]
    assert float(t.callback_metrics["csv/nexttok/pred"]) == pytest.approx(vector.predict(losses), abs=1e-6)
    assert len(load_losses(tmp_path / "store").names) == 3


def test_validate_alone_logs_predictions(probe, tmp_path):
    v = H.plain_vector(probe)
    module = H.TinyLM()
    t = H.trainer(tmp_path, [SalienceCallback(v, probe)])
    (out,) = t.validate(module, H.loaders()[1], verbose=False)
    assert out["csv/plumb/pred"] == pytest.approx(v.predict(token_losses(module, probe)), abs=1e-6)


def test_several_probes_one_forward_each(probe, tmp_path):
    small = H.make_probe(n_texts=2, max_length=40)
    vectors = [H.plain_vector(probe, "a"), H.plain_vector(probe, "b", seed=1), H.plain_vector(small, "c")]
    module = H.TinyLM()
    cb = SalienceCallback(vectors, [probe, small, probe], save_dir=tmp_path / "store")
    assert len(cb.probes) == 2  # the repeated probe is run once
    t = H.trainer(tmp_path, [cb], max_steps=2)
    t.fit(module, *H.loaders())
    for v, p in zip(vectors, (probe, probe, small)):
        assert float(t.callback_metrics[f"csv/{v.task}/pred"]) == pytest.approx(
            v.predict(token_losses(module, p)), abs=1e-6
        )
        assert f"csv/{p.fingerprint}/probe_mean_loss" in t.callback_metrics
        assert load_losses(tmp_path / "store" / p.fingerprint).losses.shape == (1, p.n_tokens)


# ---------------------------------------------------------------------- stock callbacks on the prediction
def test_early_stopping_stops_when_predicted_score_stops_improving(probe, tmp_path):
    # The learning rate drops to 0 after 4 steps: the prediction improves until step 4, then is flat.
    es = EarlyStopping(monitor="csv/plumb/pred", mode="max", patience=2, min_delta=1e-7)
    cb = SalienceCallback(H.plain_vector(probe), probe)
    t = H.trainer(tmp_path, [cb, es], max_steps=40, val_every=2)
    t.fit(H.TinyLM(lr=0.05, lr_until=4), *H.loaders(n_train=80))
    preds = [r["pred"] for r in cb.history]
    assert preds[1] > preds[0]  # it did improve while training
    # Best at step 4, then two validations without improvement (steps 6 and 8): stop at step 8.
    assert t.global_step == 8 and t.should_stop
    assert float(es.best_score) == pytest.approx(max(preds), abs=1e-7)


def test_model_checkpoint_selects_the_best_predicted_score(probe, tmp_path):
    # A high learning rate makes the predicted score rise and fall, so the best is not simply the last.
    v = H.plain_vector(probe)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="csv/plumb/pred", mode="max", save_top_k=1,
                           filename="{step}")
    cb = SalienceCallback(v, probe)
    t = H.trainer(tmp_path, [cb, ckpt], max_steps=12, val_every=2)
    t.fit(H.TinyLM(lr=0.2), *H.loaders(n_train=80))
    preds = {r["step"]: r["pred"] for r in cb.history}
    best_step = max(preds, key=preds.get)
    assert float(ckpt.best_model_score) == pytest.approx(preds[best_step], abs=1e-7)
    assert Path(ckpt.best_model_path).name == f"step={best_step}.ckpt"
    # The selected checkpoint really is the model that scored best.
    best = H.TinyLM.load_from_checkpoint(ckpt.best_model_path, weights_only=True)
    assert v.predict(token_losses(best, probe)) == pytest.approx(preds[best_step], abs=1e-6)


# ---------------------------------------------------------------------- resume
def test_resumed_run_continues_the_series_without_gaps_or_duplicates(probe, tmp_path):
    v = H.plain_vector(probe)
    # The first run dies in step 8: its last checkpoint is the one of the validation at step 6.
    cb = H.crashed_then_resumed(tmp_path, lambda: SalienceCallback(v, probe, save_dir=tmp_path / "store"))
    assert [r["step"] for r in cb.history] == [2, 4, 6, 8, 10, 12]
    first = H.read_csv_metrics(tmp_path / "csv/version_0", "csv/plumb/pred")  # raises on a duplicated step
    second = H.read_csv_metrics(tmp_path / "csv/version_1", "csv/plumb/pred")
    assert sorted(first) == [1, 3, 5] and sorted(second) == [7, 9, 11]
    assert load_losses(tmp_path / "store").steps.tolist() == [2, 4, 6, 8, 10, 12]

    # The series equals that of one uninterrupted run (6 batches per epoch: the checkpoint at step 6 ends
    # an epoch, so Lightning resumes the data exactly where it was).
    straight = tmp_path / "straight"
    cb2 = SalienceCallback(v, probe)
    H.trainer(straight, [cb2], max_steps=12, val_every=2).fit(H.TinyLM(), *H.loaders(n_train=48))
    assert [r["pred"] for r in cb2.history] == pytest.approx([r["pred"] for r in cb.history], abs=1e-6)


# ---------------------------------------------------------------------- faults
def test_nan_losses_warn_log_nan_and_training_continues(probe, tmp_path):
    cb = SalienceCallback(H.plain_vector(probe), probe, save_dir=tmp_path / "store")
    t = H.trainer(tmp_path, [cb], max_steps=8, val_every=2)
    with pytest.warns(RuntimeWarning, match=rf"{probe.n_tokens} of {probe.n_tokens} probe token losses are NaN/inf at "
                                            r"step 4 .*logged as NaN with extrapolating=1\.0"):
        t.fit(H.TinyLM(poison_at=3), *H.loaders())
    assert t.global_step == 8
    preds = H.read_csv_metrics(tmp_path / LOGS, "csv/plumb/pred")
    flags = H.read_csv_metrics(tmp_path / LOGS, "csv/nonfinite_losses")
    extrapolating = H.read_csv_metrics(tmp_path / LOGS, "csv/plumb/extrapolating")
    assert not math.isnan(preds[1]) and flags[1] == 0
    for step in (3, 5, 7):
        # A NaN prediction is flagged as extrapolating, as SalienceTrainerCallback flags it: never a confident one.
        assert math.isnan(preds[step]) and flags[step] == probe.n_tokens and extrapolating[step] == 1.0
    # Only the finite checkpoints were stored, and they still load.
    assert load_losses(tmp_path / "store").steps.tolist() == [2]


def test_losses_failing_mid_run_warn_skip_the_predictions_and_training_continues(probe, tmp_path):
    # The model passes the check at fit start, then cannot score the probe's 48-token sequences from step 3 on.
    cb = SalienceCallback(H.plain_vector(probe), probe, save_dir=tmp_path / "store")
    t = H.trainer(tmp_path, [cb, ShrinkContextAt(3)], max_steps=6, val_every=2)
    module = H.TinyLM()
    expected = (rf"could not compute the token losses of probe {probe.fingerprint} at step 4 \(IndexError: .*\); "
                r"this evaluation's predictions are skipped .*training continues")
    with pytest.warns(RuntimeWarning, match=expected):
        t.fit(module, *H.loaders(n_train=48))
    assert t.global_step == 6
    preds = H.read_csv_metrics(tmp_path / LOGS, "csv/plumb/pred")
    extrapolating = H.read_csv_metrics(tmp_path / LOGS, "csv/plumb/extrapolating")
    mean_loss = H.read_csv_metrics(tmp_path / LOGS, "csv/probe_mean_loss")
    assert not math.isnan(preds[1]) and extrapolating[1] == 0.0
    for step in (3, 5):  # the skipped validations: NaN, flagged, so no monitor takes them for a real score
        assert math.isnan(preds[step]) and math.isnan(mean_loss[step]) and extrapolating[step] == 1.0
    assert [r["step"] for r in cb.history] == [2, 4, 6]
    assert load_losses(tmp_path / "store").steps.tolist() == [2]
    # Outside a training run the same failure raises.
    with pytest.raises(IndexError):
        t.validate(module, H.loaders()[1], verbose=False)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare to mount a tiny tmpfs")
def test_full_disk_in_save_dir_and_wandb_media_warns_and_keeps_what_was_saved(tmp_path):
    # Real ENOSPC, in a private mount namespace: save_dir is on a 32 KiB tmpfs (the probe file and two loss
    # files fit), and the W&B run's media directory is on a full tmpfs, so the table and HTML view fail.
    small = tmp_path / "small"
    small.mkdir()
    cmd = f"mount -t tmpfs -o size=32k tmpfs {small} && {sys.executable} {H.__file__} fault {tmp_path} {small}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "mount" in proc.stderr and "ermission" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "fault.json").read_text())
    assert res["global_step"] == 8  # training ran to the end
    assert res["history_steps"] == [2, 4, 6, 8]  # every prediction was still computed
    # What fit is intact and loadable, no temporary file is left behind, and each failure warned.
    stored = res["stored_steps"]
    assert 1 <= len(stored) < 4 and stored == [2, 4, 6][: len(stored)]
    assert res["stored_ok"] and res["leftover_tmp"] == []
    assert sum("could not save the probe losses" in w for w in res["warnings"]) == 4 - len(stored)
    assert sum("could not log the predictions table to W&B" in w for w in res["warnings"]) == 4
    assert any("could not log the salience view" in w for w in res["warnings"])
    # The scalars still reached W&B through Lightning's own logging.
    summary = json.loads(subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", res["run_dir"]],
                                        capture_output=True, text=True, check=True).stdout)["summary"]
    assert "max" in summary["csv/plumb/pred"]
