"""Which run writes a loss store (run.json), and a store whose directory is deleted while a run writes it."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from csv_callback import ProbeSet
from csv_callback.probe import ProbeMismatchError
from csv_callback.store import LossStore, RunMismatchError, load_losses


def snapshot(root) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: to show that a refused open changed nothing."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_fresh_run_claims_its_store_and_a_resumed_run_finds_its_own(tmp_path, probe):
    root, ones = tmp_path / "store", np.ones(probe.n_tokens, np.float32)
    store = LossStore(root, probe, run_id="run-a")
    assert store.run_id == "run-a"
    assert json.loads((root / "run.json").read_text()) == {"format": "csv_callback.run/1", "run_id": "run-a"}
    store.write("step-000000002", ones, step=2)
    resumed = LossStore(root, probe, run_id="run-a")  # a resumed run restores its id
    resumed.write("step-000000004", ones * 2, step=4)
    table = load_losses(root)
    assert table.names == ["step-000000002", "step-000000004"] and table.steps.tolist() == [2, 4]
    # Readers and collect open it without a run id: nothing is checked or written.
    before = snapshot(root)
    assert LossStore(root).run_id is None and LossStore(root, probe).fingerprint == probe.fingerprint
    assert snapshot(root) == before


def test_a_fresh_run_into_another_runs_store_is_refused_before_anything_is_written(tmp_path, probe):
    root = tmp_path / "store"
    LossStore(root, probe, run_id="run-a").write("step-000000002", np.ones(probe.n_tokens, np.float32), step=2)
    before = snapshot(root)
    with pytest.raises(RunMismatchError) as raised:
        LossStore(root, probe, run_id="run-b")
    assert str(raised.value) == (
        f"{root} holds the losses of run 'run-a' (recorded in {root / 'run.json'}), and run 'run-b' would mix its own "
        "steps into them. A fresh run needs a save_dir of its own; to continue that run, resume it from one of its "
        f"checkpoints (which restores its run id); or delete {root} to start over."
    )
    assert isinstance(raised.value, ValueError)
    # Loss files of a run that recorded no id (collect, or csv-callback before run ids) are not claimed either.
    collected = tmp_path / "collected"
    LossStore(collected, probe).write("ckpt-1", np.ones(probe.n_tokens, np.float32), step=1)
    with pytest.raises(RunMismatchError, match=rf"{collected} holds the losses of a run that recorded no run id "
                                               rf"\({collected / 'run.json'} is missing"):
        LossStore(collected, probe, run_id="run-b")
    assert not (collected / "run.json").exists()
    assert snapshot(root) == before


def test_a_store_without_losses_is_claimed_but_a_probe_mismatch_claims_nothing(tmp_path, probe, tokenizer):
    root = tmp_path / "store"
    LossStore(root, probe)  # probe.safetensors and an empty losses/ only
    assert LossStore(root, probe, run_id="run-a").run_id == "run-a"
    assert json.loads((root / "run.json").read_text())["run_id"] == "run-a"
    other = tmp_path / "other"
    LossStore(other, ProbeSet.from_texts(["Another probe altogether."], tokenizer, 16))
    with pytest.raises(ProbeMismatchError):
        LossStore(other, probe, run_id="run-b")
    assert not (other / "run.json").exists()


def test_a_corrupt_run_record_is_named(tmp_path, probe):
    root = tmp_path / "store"
    LossStore(root, probe, run_id="run-a")
    for text in ["{not json", json.dumps({"format": "csv_callback.run/1", "run_id": 7}), "[]"]:
        (root / "run.json").write_text(text)
        with pytest.raises(
            ValueError,
            match=rf"{root / 'run.json'} is not a readable record of the run that writes "
            rf"{root} \(.+\); it is corrupt or not csv-callback's: use a new save_dir",
        ):
            LossStore(root, probe, run_id="run-a")
    with pytest.raises(ValueError, match=r"LossStore: run_id must be a non-empty str, got ''"):
        LossStore(root, probe, run_id="")


@pytest.mark.parametrize("run_id", [None, "run-a"])
def test_a_store_deleted_mid_run_is_recreated_whole_with_one_warning(tmp_path, probe, run_id):
    root, ones = tmp_path / "save_dir", np.ones(probe.n_tokens, np.float32)
    store = LossStore(root, probe, run_id=run_id)
    store.write("step-000000002", ones, step=2)
    shutil.rmtree(root)
    with pytest.warns(RuntimeWarning) as caught:
        store.write("step-000000004", ones * 2, step=4)
    assert len(caught) == 1
    assert str(caught[0].message) == (
        f"the loss store {root} had disappeared (its probe.safetensors was gone: the directory was deleted or emptied "
        f"while a run was writing to it); it is recreated with its probe{' and run.json' if run_id else ''}, but the "
        "loss files saved in it before are lost: later steps are saved as usual."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.write("step-000000006", ones * 3, step=6)
    # The store is whole again: fit's way of opening it finds its probe, and a resumed run is recognised.
    assert LossStore(root).probe().fingerprint == probe.fingerprint
    assert load_losses(root, probe.fingerprint).steps.tolist() == [4, 6]
    assert (root / "run.json").exists() == (run_id is not None)
    if run_id is not None:
        assert LossStore(root, probe, run_id=run_id).run_id == run_id


def test_a_store_opened_without_its_probe_cannot_recreate_it(tmp_path, probe):
    root = tmp_path / "store"
    LossStore(root, probe).write("a", np.ones(probe.n_tokens, np.float32), step=1)
    store = LossStore(root)
    shutil.rmtree(root)
    with pytest.raises(FileNotFoundError, match=rf"{root / 'probe.safetensors'} has disappeared since the store was "
                                                rf"opened, and the store was opened without a probe"):
        store.write("b", np.ones(probe.n_tokens, np.float32), step=2)
    assert not root.exists()
