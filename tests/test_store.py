"""LossStore and load_losses on bad input: a bad row is refused before it is written, and a bad file is named."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from csv_callback import ProbeSet
from csv_callback.files import atomic_save
from csv_callback.probe import ProbeMismatchError
from csv_callback.store import LossStore, load_losses


def files(store: LossStore) -> dict[str, bytes]:
    """Every file of the store's losses directory, by name: to show that nothing was changed or added."""
    return {p.name: p.read_bytes() for p in sorted((store.root / "losses").iterdir())}


def rewrite(path, tensor: torch.Tensor) -> None:
    """Replace the tensor of a loss file, keeping its metadata, as another tool or a damaged disk might."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    atomic_save({"losses": tensor}, meta, path)


def test_write_refuses_losses_that_do_not_fit_the_probe(store, probe):
    n = probe.n_tokens
    before = files(store)
    for losses, match in [
        (np.ones(n - 5), rf"'bad' have {n - 5} entries, but the probe of .* scores {n} tokens"),
        (np.r_[np.nan, np.ones(n - 1)], r"1 non-finite value"),
        (torch.full((n,), 1e40, dtype=torch.float64), rf"{n} non-finite value"),  # inf once stored as float32
        (np.ones((2, n)), r"must have 1 dimension\(s\), got shape \(2, "),
    ]:
        with pytest.raises(ValueError, match=match):
            store.write("bad", losses)
    with pytest.raises(ValueError, match="pass an int step"):
        store.write("bad", np.ones(n), step="abc")
    assert files(store) == before
    assert load_losses(store.root).names == ["step-0", "step-1", "step-2"]


def test_write_never_replaces_another_checkpoint_of_the_same_file_name(store, probe):
    store.write("mix a/ck", np.full(probe.n_tokens, 5.0, np.float32), step=9)
    before = files(store)
    with pytest.raises(ValueError, match=r"already holds checkpoint 'mix a/ck', and 'mix_a/ck' would replace it"):
        store.write("mix_a/ck", np.full(probe.n_tokens, 6.0, np.float32), step=9)
    assert files(store) == before
    assert "mix a/ck" in store and "mix_a/ck" not in store
    # Re-writing the same checkpoint (a resumed run) still replaces its row.
    store.write("mix a/ck", np.full(probe.n_tokens, 7.0, np.float32), step=9)
    table = load_losses(store.root)
    assert table.names[-1] == "mix a/ck" and set(table.losses[-1]) == {7.0}


def test_load_losses_validates_each_file_and_names_it(store, probe, tokenizer):
    n = probe.n_tokens
    path = store.path_for("step-1")
    for tensor, match in [
        (torch.cat([torch.tensor([float("nan")]), torch.ones(n - 1)]),
         r"step-1.safetensors \(checkpoint 'step-1'\) holds 1 NaN or inf loss"),
        (torch.ones(n, 2), r"step-1.safetensors: 'losses' is a F32 tensor of shape \[\d+, 2\], not a non-empty 1-D"),
        (torch.ones(n, dtype=torch.int64), r"step-1.safetensors: 'losses' is a I64 tensor"),
        (torch.ones(n - 3), rf"step-1.safetensors holds {n - 3} losses, but the probe of .*store has {n};"),
    ]:
        rewrite(path, tensor)
        with pytest.raises(ValueError, match=match):
            load_losses(store.root)
    # bfloat16 is a float dtype: read as float32 (2.0 is exact in both).
    rewrite(path, torch.full((n,), 2.0).bfloat16())
    table = load_losses(store.root)
    assert table.losses.dtype == np.float32 and set(table.losses[1]) == {2.0}
    # The store's probe.safetensors must be the probe its loss files were collected on.
    ProbeSet.from_texts(["Another probe altogether."], tokenizer, 16).save(store.root / "probe.safetensors")
    with pytest.raises(ProbeMismatchError, match=r"probe.safetensors is probe \w+, but the loss files of"):
        load_losses(store.root)


def test_params_are_stored_next_to_tokens_seen_and_unknown_in_files_written_before(store, probe):
    n = probe.n_tokens
    store.write("step-3", np.full(n, 4.0, np.float32), step=3, tokens_seen=3072.0, params=84288)
    # A file written before params were recorded: the same metadata without the key.
    old = store.path_for("step-0")
    with safe_open(str(old), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "params"}
    atomic_save({"losses": torch.ones(n)}, meta, old)
    table = load_losses(store.root)
    assert table.names == ["step-0", "step-1", "step-2", "step-3"]
    assert np.isnan(table.params[:3]).all() and table.params[3] == 84288.0 and table.params.dtype == np.float64
    assert table.tokens_seen[3] == 3072.0 and store.stored("step-3")["params"] == 84288.0
    before = files(store)
    for bad in (0, -5, float("nan"), float("inf"), "84288", True):
        with pytest.raises(ValueError, match="positive params count"):
            store.write("step-4", np.ones(n), step=4, params=bad)
    assert files(store) == before
