"""SalienceCallback under DDP: 2 CPU processes (gloo) shard the probe, gather, and log the same values."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning_helpers as H
import pytest
from safetensors.torch import load_model

from csv_callback import ProbeSet, SalienceVector, token_losses
from csv_callback.store import load_losses
from csv_callback.testing import tiny_gpt2


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # Lightning's "ddp" strategy starts rank 1 by re-running this command line.
    proc = subprocess.run([sys.executable, H.__file__, "ddp", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_rank_logs_identical_values(ddp_out):
    rank0, rank1 = _rows(ddp_out / "rank0.jsonl"), _rows(ddp_out / "rank1.jsonl")
    assert [r["step"] for r in rank0] == [2, 4, 4]  # two validations in fit, then trainer.validate()
    assert rank0 == rank1  # exactly equal, so EarlyStopping decisions agree


def test_sharded_predictions_equal_single_process(ddp_out):
    model = tiny_gpt2(len(H.tokenizer()), n_positions=64)
    load_model(model, str(ddp_out / "model.safetensors"))
    final = _rows(ddp_out / "rank0.jsonl")[-1]
    for name in "abc":
        probe = ProbeSet.load(ddp_out / f"probe_{name}.safetensors")
        vector = SalienceVector.load(ddp_out / f"vector_{name}.safetensors")
        losses = token_losses(model, probe)
        assert final[f"csv/{name}/pred"] == pytest.approx(vector.predict(losses), abs=1e-5)
        assert final[f"csv/{name}/weighted_loss"] == pytest.approx(vector.weighted_loss(losses), abs=1e-5)
        assert final[f"csv/{probe.fingerprint}/probe_mean_loss"] == pytest.approx(float(losses.mean()), abs=1e-5)
        # Rank 0 stored the gathered losses in probe order; the row of step 4 is the final model's.
        table = load_losses(ddp_out / "store" / probe.fingerprint, fingerprint=probe.fingerprint)
        assert table.steps.tolist() == [2, 4]
        assert abs(table.losses[-1] - losses.numpy()).max() < 1e-5


def test_shards_cover_the_probe_once_with_equal_sequence_counts():
    from csv_callback.evaluator import shard

    for probe in (H.make_probe(n_texts=4, max_length=48),
                  ProbeSet.from_texts(["One short probe text."], H.tokenizer(), max_length=16)):
        for world in (2, 3):
            shards, positions = shard(probe, world)
            assert len({len(s) for s in shards}) == 1  # the same number of forward passes on every rank
            covered = sorted(int(i) for p in positions for i in p)
            assert covered == list(range(probe.n_tokens))
