"""SalienceTrainerCallback with a real transformers.Trainer on a tiny GPT-2 (and a real offline W&B run)."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from offline_helpers import one_torch_thread
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from csv_callback import ProbeMismatchError, ProbeSet, SalienceVector, SigmoidLink, token_losses
from csv_callback.hf import SalienceTrainerCallback
from csv_callback.store import LossStore, load_losses
from csv_callback.testing import tiny_gpt2

TASK = "rare"


class Blocks(torch.utils.data.Dataset):
    """Fixed-length blocks of the pydoc corpus as causal-LM examples."""

    def __init__(self, ids: list[int], block: int = 32, n: int = 64, offset: int = 0):
        self.items = [torch.tensor(ids[offset + i * block : offset + (i + 1) * block]) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def uniform_vector(probe: ProbeSet) -> SalienceVector:
    """Equal weight on every probe token, a link over [0.25, 0.9] and the fitted range (5, 8) of weighted losses."""
    return SalienceVector(weights=np.full(probe.n_tokens, 1 / probe.n_tokens), link=SigmoidLink(0.25, 0.9, 1.5, 6.5),
                          task=TASK, probe_fingerprint=probe.fingerprint, tokenizer_hash=probe.tokenizer_hash,
                          loss_range=(5.0, 8.0))


@pytest.fixture(scope="module")
def setup(tokenizer, corpus):
    ids = tokenizer("\n".join(corpus[:40]))["input_ids"]
    # Continuations pydoc never contains: learning pydoc makes them less likely, so the predicted score
    # falls as training goes on, which early stopping must catch.
    probe = ProbeSet.from_pairs([("Value:", " QZXJ VKWQ"), ("Code", " ZZQX JXQV")], tokenizer, max_length=32)
    return Blocks(ids), Blocks(ids, n=8, offset=64 * 32), probe, uniform_vector(probe)


class ShrinkContextAt(TrainerCallback):
    """Once training reaches ``step``, the GPT-2 keeps only its first ``positions`` position embeddings.

    Training on the 32-token blocks goes on, but longer probe sequences then fail in the embedding lookup
    (IndexError): a model that stops being able to score the probe in the middle of a run.
    """

    def __init__(self, step: int, positions: int = 32):
        self.step, self.positions = step, positions

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            kept = model.transformer.wpe.weight[: self.positions].detach().clone()
            model.transformer.wpe = torch.nn.Embedding.from_pretrained(kept, freeze=False)


class BreakSaveDirAt(TrainerCallback):
    """Once training reaches ``step``, ``<save_dir>/losses`` becomes a file: every later save fails."""

    def __init__(self, save_dir: Path, step: int):
        self.save_dir, self.step = save_dir, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            losses = self.save_dir / "losses"
            for f in losses.iterdir():
                f.unlink()
            losses.rmdir()
            losses.write_text("not a directory")


def make_trainer(tmp_path, model, tokenizer, setup, callbacks, **kw):
    train, evals, _, _ = setup
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=kw.pop("max_steps", 6), per_device_train_batch_size=8,
        per_device_eval_batch_size=8, learning_rate=3e-3, eval_strategy="steps", eval_steps=2,
        save_strategy=kw.pop("save_strategy", "steps"), save_steps=2, logging_steps=2,
        report_to=kw.pop("report_to", "none"), use_cpu=True, seed=0, disable_tqdm=True, **kw,
    )
    return Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer,
                   callbacks=callbacks)


def test_predictions_in_eval_metrics_history_and_save_dir(tmp_path, model, tokenizer, setup):
    _, _, probe, vector = setup
    cb = SalienceTrainerCallback([vector], probe, batch_size=2, save_dir=tmp_path / "losses")
    trainer = make_trainer(tmp_path, model, tokenizer, setup, [cb])
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4, 6]
    for h in evals:
        assert 0.25 <= h[f"eval_csv/{TASK}/pred"] <= 0.9
        assert h["eval_csv/eval_seconds"] > 0 and h["eval_csv/nonfinite_losses"] == 0.0
    # The last logged prediction is the vector applied to the final model's probe losses.
    losses = token_losses(trainer.model, probe)
    assert evals[-1][f"eval_csv/{TASK}/pred"] == pytest.approx(vector.predict(losses.numpy()), abs=1e-6)
    assert evals[-1]["eval_csv/probe_mean_loss"] == pytest.approx(float(losses.double().mean()), abs=1e-6)
    # A manual evaluate() returns them too.
    metrics = trainer.evaluate()
    assert metrics[f"eval_csv/{TASK}/pred"] == pytest.approx(evals[-1][f"eval_csv/{TASK}/pred"], abs=1e-6)
    # save_dir is a loss store, readable by the CLI's fit/predict.
    table = load_losses(tmp_path / "losses", probe.fingerprint)
    assert table.names == ["step-000000002", "step-000000004", "step-000000006"] and table.steps.tolist() == [2, 4, 6]
    np.testing.assert_allclose(table.losses[-1], losses.numpy(), atol=1e-6)


def test_early_stopping_and_best_model_on_predicted_score(tmp_path, model, tokenizer, setup):
    _, _, probe, vector = setup
    cb = SalienceTrainerCallback([vector], probe)
    trainer = make_trainer(tmp_path, model, tokenizer, setup, [cb, EarlyStoppingCallback(early_stopping_patience=1)],
                           max_steps=40, metric_for_best_model=f"csv/{TASK}/pred", greater_is_better=True,
                           load_best_model_at_end=True)
    trainer.train()
    preds = {h["step"]: h[f"eval_csv/{TASK}/pred"] for h in trainer.state.log_history if "eval_loss" in h}
    assert preds[4] < preds[2]  # the predicted score fell ...
    assert trainer.state.global_step == 4  # ... so training stopped after one evaluation without improvement
    assert trainer.state.best_metric == pytest.approx(preds[2])
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    # load_best_model_at_end restored the step-2 weights: their prediction is the best one, also via evaluate().
    assert vector.predict(token_losses(trainer.model, probe).numpy()) == pytest.approx(preds[2], abs=1e-6)
    assert trainer.evaluate()[f"eval_csv/{TASK}/pred"] == pytest.approx(preds[2], abs=1e-6)


def test_attached_callback_reaches_wandb(tmp_path, model, tokenizer, setup, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "csv-callback-tests")
    wandb.finish()  # HF's WandbCallback logs into an already active run instead of starting its own
    _, _, probe, vector = setup
    cb = SalienceTrainerCallback([vector], probe)
    trainer = cb.attach(make_trainer(tmp_path, model, tokenizer, setup, [], max_steps=4, report_to="wandb"))
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()
    run_dir = Path(wandb.run.dir).parent  # .../offline-run-<date>-<id>/files
    wandb.finish()
    logged = [h[f"eval_csv/{TASK}/pred"] for h in trainer.state.log_history if "eval_loss" in h]
    # The `wandb` command, as tests/test_callback_wandb.py reads runs: .ci/lower-bounds puts a current reader there.
    out = subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    flat = json.dumps(summary)
    assert f"csv/{TASK}/pred" in flat
    # WandbCallback renames eval_x to eval/x; the summary holds the last value.
    value = _find(summary, f"eval/csv/{TASK}/pred")
    assert value == pytest.approx(logged[-1], abs=1e-6)


def _find(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def test_unattached_with_tracker_warns(tmp_path, model, tokenizer, setup, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb

    wandb.finish()
    _, _, probe, vector = setup
    trainer = make_trainer(tmp_path, model, tokenizer, setup, [SalienceTrainerCallback([vector], probe)], max_steps=2,
                           report_to="wandb")
    with pytest.warns(UserWarning, match="attach"):
        trainer.train()
    import wandb

    wandb.finish()


def test_wrong_tokenizer_fails_before_training(tmp_path, model, corpus, setup):
    from csv_callback.testing import train_tokenizer

    _, _, probe, vector = setup
    other = train_tokenizer(corpus[:50], vocab_size=300)
    trainer = make_trainer(tmp_path, model, other, setup, [SalienceTrainerCallback([vector], probe)])
    with pytest.raises(ValueError, match="not the one this probe was built with"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_bad_constructor_arguments(setup, tokenizer):
    _, _, probe, vector = setup
    with pytest.raises(ValueError, match="distinct tasks"):
        SalienceTrainerCallback([vector, vector], probe)
    with pytest.raises(ValueError, match="at least one"):
        SalienceTrainerCallback([], probe)
    with pytest.raises(ValueError, match="batch_size"):
        SalienceTrainerCallback([vector], probe, batch_size=0)
    other = ProbeSet.from_texts(["a different probe text"], tokenizer)
    with pytest.raises(ValueError, match="fitted on probe"):
        SalienceTrainerCallback([vector], other)


def test_nonfinite_losses_warn_and_log_nan(tmp_path, model, tokenizer, setup):
    _, _, probe, vector = setup
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # every logit row then holds a NaN
    trainer = make_trainer(tmp_path, model, tokenizer, setup, [SalienceTrainerCallback([vector], probe)])
    with pytest.warns(RuntimeWarning, match=rf"{probe.n_tokens} of {probe.n_tokens} probe token losses are NaN/inf at "
                                            r"step 0 .*logged as NaN with extrapolating=1\.0"):
        metrics = trainer.evaluate()
    assert np.isnan(metrics[f"eval_csv/{TASK}/pred"]) and metrics["eval_csv/nonfinite_losses"] == probe.n_tokens
    # Flagged as the Lightning SalienceCallback flags it: a NaN prediction is never a confident in-range one.
    assert metrics[f"eval_csv/{TASK}/extrapolating"] == 1.0


# ---------------------------------------------------------------------- faults: before training, then during it
def test_save_dir_of_another_probe_or_not_a_directory_fails_before_training(tmp_path, model, tokenizer, setup):
    _, _, probe, vector = setup
    other = ProbeSet.from_texts(["another probe's text"], tokenizer)
    LossStore(tmp_path / "store", other)
    cb = SalienceTrainerCallback([vector], probe, save_dir=tmp_path / "store")
    trainer = make_trainer(tmp_path, model, tokenizer, setup, [cb])
    expected = (rf"SalienceTrainerCallback\(save_dir=.*\): .* holds losses of probe {other.fingerprint}, not of probe "
                rf"{probe.fingerprint}; use a new directory")
    with pytest.raises(ProbeMismatchError, match=expected):
        trainer.train()
    assert trainer.state.global_step == 0
    (tmp_path / "file").write_text("not a directory")
    cb = SalienceTrainerCallback([vector], probe, save_dir=tmp_path / "file")
    trainer = make_trainer(tmp_path, model, tokenizer, setup, [cb])
    with pytest.raises(ValueError, match=r"SalienceTrainerCallback\(save_dir=.*file'\) cannot be used .*writable"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_probe_longer_than_the_context_window_fails_before_training(tmp_path, tokenizer, corpus, setup):
    text = " ".join(corpus[20][:3000].split())
    probe = ProbeSet.from_texts(["Short probe text here.", text], tokenizer, max_length=128)
    cb = SalienceTrainerCallback([uniform_vector(probe)], probe)
    trainer = make_trainer(tmp_path, tiny_gpt2(len(tokenizer), n_positions=64), tokenizer, setup, [cb], max_steps=4)
    expected = (r"SalienceTrainerCallback cannot compute the probe's token losses with the Trainer's model .*the "
                r"longest sequence of probe \w+ \(128 tokens\).*rebuild the probe with a smaller max_length")
    with pytest.raises(ValueError, match=expected):
        trainer.train()
    assert trainer.state.global_step == 0
    # A lone evaluate() is no run to protect either: it fails the same way, before computing anything.
    with pytest.raises(ValueError, match=expected):
        trainer.evaluate()


def test_losses_failing_mid_run_warn_skip_the_predictions_and_training_continues(tmp_path, model, tokenizer, corpus,
                                                                                   setup):
    # The model passes the check at train start, then cannot score the probe's 48-token sequences from step 3 on.
    probe = ProbeSet.from_texts([t[:400] for t in corpus[:3]], tokenizer, max_length=48)
    cb = SalienceTrainerCallback([uniform_vector(probe)], probe, save_dir=tmp_path / "losses")
    trainer = make_trainer(tmp_path, model, tokenizer, setup, [cb, ShrinkContextAt(3)], save_strategy="no")
    expected = (rf"SalienceTrainerCallback could not compute the token losses of probe {probe.fingerprint} at step 4 "
                r"\(IndexError: .*\); this evaluation's predictions are skipped .*training continues")
    with pytest.warns(RuntimeWarning, match=expected):
        trainer.train()
    assert trainer.state.global_step == 6
    evals = {h["step"]: h for h in trainer.state.log_history if "eval_loss" in h}
    assert sorted(evals) == [2, 4, 6] and evals[2][f"eval_csv/{TASK}/extrapolating"] == 0.0
    assert np.isfinite(evals[2][f"eval_csv/{TASK}/pred"])
    for step in (4, 6):  # the skipped evaluations: NaN, flagged, so no monitor takes them for a real score
        assert np.isnan(evals[step][f"eval_csv/{TASK}/pred"]) and np.isnan(evals[step]["eval_csv/probe_mean_loss"])
        assert evals[step][f"eval_csv/{TASK}/extrapolating"] == 1.0
    assert load_losses(tmp_path / "losses").steps.tolist() == [2]
    # Outside a training run the same failure raises.
    with pytest.raises(IndexError):
        trainer.evaluate()


def test_save_failing_mid_run_warns_and_training_continues(tmp_path, model, tokenizer, setup):
    _, _, probe, vector = setup
    cb = SalienceTrainerCallback([vector], probe, save_dir=tmp_path / "losses")
    trainer = make_trainer(tmp_path, model, tokenizer, setup, [cb, BreakSaveDirAt(tmp_path / "losses", 3)],
                           save_strategy="no")
    with pytest.warns(RuntimeWarning, match=r"SalienceTrainerCallback could not save the probe losses of step 4 to "
                                            r".*losses \(FileExistsError: .*\); training continues"):
        trainer.train()
    assert trainer.state.global_step == 6
    # The predictions did not depend on the save.
    preds = [h[f"eval_csv/{TASK}/pred"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(preds) == 3 and np.isfinite(preds).all()


# ------------------------------------------------------------------ what is evaluated, and which run writes save_dir
def _preds(trainer) -> dict[int, float]:
    return {h["step"]: h[f"eval_csv/{TASK}/pred"] for h in trainer.state.log_history if "eval_loss" in h}


def test_final_evaluate_of_the_best_model_is_a_new_evaluation_not_the_last_step(tmp_path, model, tokenizer, setup):
    # The README's recipe: keep the best model by the predicted score, then the usual final evaluate().
    _, _, probe, vector = setup
    cb = SalienceTrainerCallback([vector], probe, save_dir=tmp_path / "losses")
    trainer = make_trainer(tmp_path, model, tokenizer, setup, [cb], metric_for_best_model=f"csv/{TASK}/pred",
                           greater_is_better=True, load_best_model_at_end=True)
    trainer.train()
    preds = _preds(trainer)
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2") and preds[6] < preds[2]
    before = load_losses(tmp_path / "losses", probe.fingerprint)
    history = [dict(row) for row in cb.history]
    metrics = trainer.evaluate()
    assert metrics[f"eval_csv/{TASK}/pred"] == pytest.approx(preds[2], abs=1e-6)
    after = load_losses(tmp_path / "losses", probe.fingerprint)
    # The best model's losses are stored under their own name; the trained steps' files are untouched.
    assert before.names == ["step-000000002", "step-000000004", "step-000000006"]
    assert sorted(after.names) == ["eval-checkpoint-2-step-000000002", *before.names]
    for name, row in zip(before.names, before.losses):
        np.testing.assert_array_equal(after.losses[after.names.index(name)], row)
    np.testing.assert_allclose(after.losses[after.names.index("eval-checkpoint-2-step-000000002")],
                               token_losses(trainer.model, probe).numpy(), atol=1e-6)
    # The run's history keeps its rows and gains the evaluation's.
    assert cb.history[: len(history)] == history
    assert cb.history[-1]["name"] == "eval-checkpoint-2-step-000000002"


def test_evaluating_several_checkpoints_in_one_trainer_gives_each_its_own_prediction(tmp_path, model, tokenizer,
                                                                                     setup):
    from safetensors.torch import load_file

    _, _, probe, vector = setup
    cb = SalienceTrainerCallback([vector], probe)
    trainer = make_trainer(tmp_path, model, tokenizer, setup, [cb])
    trainer.train()
    got = {}
    for step in (2, 6):
        weights = load_file(tmp_path / "out" / f"checkpoint-{step}" / "model.safetensors")
        missing, unexpected = trainer.model.load_state_dict(weights, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied to the input embedding
        got[step] = trainer.evaluate()[f"eval_csv/{TASK}/pred"]
        assert got[step] == pytest.approx(vector.predict(token_losses(trainer.model, probe).numpy()), abs=1e-6)
    assert got[2] != pytest.approx(got[6], abs=1e-4)


def test_a_fresh_run_into_another_runs_save_dir_fails_and_a_resumed_run_continues_it(tmp_path, model, tokenizer,
                                                                                      setup):
    from csv_callback import RunMismatchError

    _, _, probe, vector = setup
    first = SalienceTrainerCallback([vector], probe, save_dir=tmp_path / "losses")
    make_trainer(tmp_path, model, tokenizer, setup, [first], max_steps=4).train()
    assert load_losses(tmp_path / "losses").steps.tolist() == [2, 4]
    # Another fresh run into the same directory would mix two runs' losses: it fails before its first step.
    other = SalienceTrainerCallback([vector], probe, save_dir=tmp_path / "losses")
    trainer = make_trainer(tmp_path / "other", tiny_gpt2(len(tokenizer)), tokenizer, setup, [other])
    with pytest.raises(RunMismatchError, match=r"holds the losses of run .* a save_dir of its own"):
        trainer.train()
    assert trainer.state.global_step == 0 and load_losses(tmp_path / "losses").steps.tolist() == [2, 4]
    # The first run resumed from its checkpoint (a new process: a new callback) is the same run and goes on.
    resumed = SalienceTrainerCallback([vector], probe, save_dir=tmp_path / "losses")
    trainer = make_trainer(tmp_path, tiny_gpt2(len(tokenizer)), tokenizer, setup, [resumed])
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert load_losses(tmp_path / "losses").steps.tolist() == [2, 4, 6]
    assert [row["step"] for row in resumed.history] == [2, 4, 6]
    assert resumed.history[:2] == first.history
