"""SalienceCallback across a run's life: other weights evaluated after fit, runs sharing a save_dir, resumes
that lost a validation or changed the vectors, LightningCLI configs. Real Trainer, real checkpoints, real files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import lightning_helpers as H
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from csv_callback import RunMismatchError
from csv_callback.callback import SalienceCallback
from csv_callback.store import load_losses

TASK = "plumb"


@pytest.fixture(scope="module")
def probe():
    return H.make_probe()


def _files(store: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((store / "losses").glob("*.safetensors"))}


def test_validating_other_weights_after_fit_adds_evaluations_and_rewrites_nothing(probe, tmp_path):
    store = tmp_path / "store"
    cb = SalienceCallback(H.plain_vector(probe), probe, save_dir=store)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=f"csv/{TASK}/pred", mode="min", save_top_k=1)
    t = H.trainer(tmp_path, [cb, best], max_steps=8, val_every=2)
    module = H.TinyLM()
    t.fit(module, *H.loaders())
    before, history = _files(store), [dict(r) for r in cb.history]
    best_step = int(torch.load(best.best_model_path, weights_only=True)["global_step"])
    assert best_step < 8, "the test needs a best checkpoint that is not the last step"

    t.validate(module, H.loaders()[1], ckpt_path="best", verbose=False)
    after = _files(store)
    assert {k: after[k] for k in before} == before  # every training step's file untouched
    stem = Path(best.best_model_path).stem
    new = sorted(set(after) - set(before))
    assert new == [f"eval-{stem}-step-{best_step:09d}.safetensors"]
    assert cb.history[: len(history)] == history  # the run's history is not rewritten
    row = cb.history[-1]
    assert row["name"] == f"eval-{stem}-step-{best_step:09d}" and row["step"] == best_step
    # The best checkpoint's weights are those of its training step: same losses, same prediction.
    table = load_losses(store)
    by_name = dict(zip(table.names, table.losses))
    np.testing.assert_allclose(by_name[row["name"]], by_name[f"step-{best_step:09d}"], atol=1e-6)
    assert row["pred"] == pytest.approx(next(r["pred"] for r in history if r["step"] == best_step), abs=1e-6)


def test_a_fresh_process_validating_checkpoints_names_each_by_its_checkpoint(probe, tmp_path):
    store = tmp_path / "store"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    H.trainer(tmp_path, [SalienceCallback(H.plain_vector(probe), probe, save_dir=store), ckpt], max_steps=4,
              val_every=2).fit(H.TinyLM(), *H.loaders())
    before = _files(store)
    paths = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(paths) == 2
    for path in paths:  # as a new process would: a new callback, a new Trainer at global_step 0
        cb = SalienceCallback(H.plain_vector(probe), probe, save_dir=store)
        H.trainer(tmp_path / "v", [cb]).validate(H.TinyLM(), H.loaders()[1], ckpt_path=path, verbose=False)
    after = _files(store)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == [f"eval-{p.stem}-step-{s:09d}.safetensors"
                                                for p, s in zip(paths, (2, 4))]
    table = load_losses(store)
    by_name = dict(zip(table.names, table.losses))
    for p, s in zip(paths, (2, 4)):
        np.testing.assert_allclose(by_name[f"eval-{p.stem}-step-{s:09d}"], by_name[f"step-{s:09d}"], atol=1e-6)


def test_a_fresh_run_into_another_runs_save_dir_fails_before_training(probe, tmp_path):
    store = tmp_path / "store"
    H.trainer(tmp_path / "a", [SalienceCallback(H.plain_vector(probe), probe, save_dir=store)], max_steps=4).fit(
        H.TinyLM(), *H.loaders())
    before = _files(store)
    t = H.trainer(tmp_path / "b", [SalienceCallback(H.plain_vector(probe), probe, save_dir=store)], max_steps=4)
    with pytest.raises(RunMismatchError, match=r"SalienceCallback\(save_dir=.*another run|SalienceCallback\(save_dir="):
        t.fit(H.TinyLM(seed=1), *H.loaders())
    assert t.global_step == 0
    assert _files(store) == before


class KillDuringValidationAt(pl.Callback):
    """Kills the run in the middle of the validation of ``step`` (after the step's checkpoint was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.global_step == self.step:
            raise RuntimeError("node lost")


def test_a_validation_cut_short_is_evaluated_when_the_run_resumes(probe, tmp_path):
    v = H.plain_vector(probe)
    store = tmp_path / "store"

    def run(version: int, extra: list, ckpt_path=None) -> SalienceCallback:
        cb = SalienceCallback(v, probe, save_dir=store)
        # Written in the step, before that step's validation.
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, save_last=True)
        logger = CSVLogger(str(tmp_path), name="csv", version=version)
        H.trainer(tmp_path, [cb, ckpt, *extra], max_steps=8, val_every=2, logger=logger).fit(
            H.TinyLM(), *H.loaders(), ckpt_path=ckpt_path)
        return cb

    with pytest.raises(RuntimeError, match="node lost"):
        run(0, [KillDuringValidationAt(4)])
    assert load_losses(store).steps.tolist() == [2]  # step 4's validation never finished
    with pytest.warns(RuntimeWarning, match="holds step 4, which this run never evaluated"):
        cb = run(1, [], ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [r["step"] for r in cb.history] == [2, 4, 6, 8]
    assert load_losses(store).steps.tolist() == [2, 4, 6, 8]
    assert sorted(H.read_csv_metrics(tmp_path / "csv/version_1", f"csv/{TASK}/pred")) == [4, 5, 7]
    # Step 4's losses are those of the checkpoint's weights.
    module = H.TinyLM()
    module.load_state_dict(torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=True)["state_dict"])
    from csv_callback import token_losses

    table = load_losses(store)
    np.testing.assert_allclose(table.losses[1], token_losses(module, probe).numpy(), atol=1e-5)


def test_resuming_with_one_more_vector_keeps_the_history_of_the_tasks_that_continue(probe, tmp_path):
    first = H.plain_vector(probe, task="first")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="node lost"):
        H.trainer(tmp_path, [SalienceCallback(first, probe), ckpt, H.CrashAt(5)], max_steps=8).fit(
            H.TinyLM(), *H.loaders())
    cb = SalienceCallback([first, H.plain_vector(probe, task="second", seed=1)], probe)
    with pytest.warns(RuntimeWarning, match=r"task\(s\) \['second'\] are new in the resumed run"):
        H.trainer(tmp_path, [cb, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_steps=8).fit(
            H.TinyLM(), *H.loaders(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [r["step"] for r in cb.history if r["task"] == "first"] == [2, 4, 6, 8]
    assert [r["step"] for r in cb.history if r["task"] == "second"] == [6, 8]


def test_a_tokenizer_attribute_that_is_not_an_hf_tokenizer_says_how_to_skip_the_check(probe, tmp_path):
    module = H.TinyLM()
    module.tokenizer = object()
    t = H.trainer(tmp_path, [SalienceCallback(H.plain_vector(probe), probe)])
    with pytest.raises(ValueError, match=r"cannot check the tokenizer object .*tokenizer_attr=None"):
        t.fit(module, *H.loaders())
    assert t.global_step == 0


class HungryLM(H.TinyLM):
    """Scores short inputs; a probe-length input makes it allocate more memory than any machine has."""

    def forward(self, ids):
        if ids.shape[1] > H.BLOCK:
            torch.empty(1 << 50, dtype=torch.uint8)
        return super().forward(ids)


def test_running_out_of_memory_in_the_check_before_training_says_so(probe, tmp_path):
    assert int(probe.lengths.max()) > H.BLOCK
    t = H.trainer(tmp_path, [SalienceCallback(H.plain_vector(probe), probe)])
    with pytest.raises(ValueError, match=r"ran out of memory.*This is not a context or vocabulary problem"):
        t.fit(HungryLM(), *H.loaders())


def test_lightning_cli_takes_a_list_of_vectors_from_a_yaml_config(probe, tmp_path):
    paths = []
    for task in ("a", "b"):
        H.plain_vector(probe, task=task).save(tmp_path / f"{task}.safetensors")
        paths.append(str(tmp_path / f"{task}.safetensors"))
    probe.save(tmp_path / "probe.safetensors")
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        trainer:
          accelerator: cpu
          max_steps: 2
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          callbacks:
            - class_path: csv_callback.callback.SalienceCallback
              init_args:
                vectors: [{paths[0]}, {paths[1]}]
                probe: {tmp_path / "probe.safetensors"}
        """))
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from lightning.pytorch.cli import LightningCLI
        import lightning_helpers as H

        class Data(H.pl.LightningDataModule):
            def train_dataloader(self):
                return H.loaders()[0]

        cli = LightningCLI(H.TinyLM, Data, run=False, save_config_callback=None)
        cb = [c for c in cli.trainer.callbacks if type(c).__name__ == "SalienceCallback"][0]
        print("TASKS", [v.task for v in cb.vectors])
        """))
    proc = subprocess.run([sys.executable, str(script), "--config", str(config)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TASKS ['a', 'b']" in proc.stdout
