"""One set of behaviour tests run against both adapters: SalienceCallback (Lightning) and SalienceTrainerCallback
(Hugging Face). Each test trains the same tiny GPT-2 with a real Trainer of either framework (see
adapter_drivers.py) and checks what the user sees: the metrics of every evaluation, the callback's history and
its save_dir. Both adapters wrap one SalienceEvaluator, so they must agree on all of it.
"""

from __future__ import annotations

import json
import math
import subprocess

import lightning_helpers as H
import numpy as np
import pytest
import torch
from adapter_drivers import DRIVERS, ProbeForwards, ddp_command, ddp_probes, two_probes
from offline_helpers import one_torch_thread, subprocess_env
from safetensors.torch import load_model

from csv_callback import ProbeMismatchError, ProbeSet, RunMismatchError, SalienceVector, token_losses
from csv_callback.store import LossStore, load_losses
from csv_callback.testing import tiny_gpt2

STEPS = [2, 4]  # the evaluations of a 4-step run evaluating every 2 steps


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(params=sorted(DRIVERS))
def driver(request):
    return DRIVERS[request.param]()


@pytest.fixture(scope="module")
def probe() -> ProbeSet:
    return H.make_probe()


def names(prefix: str, tasks: list[str], mean_losses: list[str]) -> set[str]:
    """The metric names of one training evaluation predicting ``tasks`` (so with the forecast of the run's planned
    end), with the probe mean loss names ``mean_losses``."""
    kinds = ("pred", "pred_lo", "pred_hi", "weighted_loss", "extrapolating", "forecast", "forecast_lo", "forecast_hi")
    per_task = {f"{prefix}/{t}/{m}" for t in tasks for m in kinds}
    return per_task | set(mean_losses) | {f"{prefix}/nonfinite_losses", f"{prefix}/eval_seconds"}


# ---------------------------------------------------------------------- what every evaluation logs
def test_metric_names_follow_a_custom_prefix(driver, probe, tmp_path):
    vector = H.plain_vector(probe)
    cb = driver.make(vector, probe, prefix="salience")
    run = driver.train(tmp_path, cb)
    assert cb.prefix == "salience" and sorted(run.metrics) == STEPS
    for metrics in run.metrics.values():
        assert set(metrics) == names("salience", ["plumb"], ["salience/probe_mean_loss"])
    losses = token_losses(run.model, probe)
    final = run.metrics[4]
    # abs 1e-6: Lightning hands its loggers float32 values.
    assert final["salience/plumb/pred"] == pytest.approx(vector.predict(losses), abs=1e-6)
    assert final["salience/probe_mean_loss"] == pytest.approx(float(losses.double().mean()), abs=1e-6)
    assert final["salience/nonfinite_losses"] == 0.0 and final["salience/plumb/extrapolating"] == 0.0
    assert [(r["name"], r["task"]) for r in run.history] == [("step-000000002", "plumb"), ("step-000000004", "plumb")]
    assert run.history[-1]["pred"] == pytest.approx(vector.predict(losses), abs=1e-12)


def test_several_probes_each_scored_in_one_forward_per_evaluation(driver, tmp_path):
    first, second = two_probes()
    # Two vectors share the first probe: it is still scored once per evaluation.
    vectors = [H.plain_vector(first, "a"), H.plain_vector(first, "a2", seed=1), H.plain_vector(second, "b", seed=2)]
    forwards = ProbeForwards([first, second])
    cb = driver.make(vectors, [first, second, first], batch_size=32, save_dir=tmp_path / "store")
    assert [p.fingerprint for p in cb.probes] == [first.fingerprint, second.fingerprint]  # the repeat is dropped
    run = driver.train(tmp_path, cb, watch=forwards)
    for p in (first, second):
        assert p.num_sequences <= 32
        assert [sorted(batch) for batch in forwards.batches[p.fingerprint]] == [list(range(p.num_sequences))] * 2
    means = [f"csv/{p.fingerprint}/probe_mean_loss" for p in (first, second)]
    for metrics in run.metrics.values():
        assert set(metrics) == names("csv", ["a", "a2", "b"], means)
    for v, p in zip(vectors, (first, first, second), strict=True):
        losses = token_losses(run.model, p)
        assert run.metrics[4][f"csv/{v.task}/pred"] == pytest.approx(v.predict(losses), abs=1e-6)
        assert run.metrics[4][f"csv/{p.fingerprint}/probe_mean_loss"] == pytest.approx(float(losses.mean()), abs=1e-6)
        table = load_losses(run.save_dir / p.fingerprint, fingerprint=p.fingerprint)
        assert table.steps.tolist() == STEPS
        np.testing.assert_allclose(table.losses[-1], losses.numpy(), atol=1e-6)


def test_collect_only_saves_the_losses_and_logs_only_the_probe_mean_loss(driver, probe, tmp_path):
    cb = driver.make(None, probe, save_dir=tmp_path / "store")
    run = driver.train(tmp_path, cb)
    assert run.save_dir == tmp_path / "store" and cb.vectors == [] and run.history == []
    for metrics in run.metrics.values():
        assert set(metrics) == names("csv", [], ["csv/probe_mean_loss"])
    losses = token_losses(run.model, probe)
    assert run.metrics[4]["csv/probe_mean_loss"] == pytest.approx(float(losses.double().mean()), abs=1e-6)
    table = load_losses(run.save_dir, fingerprint=probe.fingerprint)
    assert table.names == ["step-000000002", "step-000000004"] and table.steps.tolist() == STEPS
    np.testing.assert_allclose(table.losses[-1], losses.numpy(), atol=1e-6)


def test_every_stored_evaluation_records_the_model_parameter_count(driver, probe, tmp_path):
    cb = driver.make(None, probe, save_dir=tmp_path / "store")
    run = driver.train(tmp_path, cb)
    table = load_losses(run.save_dir, fingerprint=probe.fingerprint)
    count = sum(p.numel() for p in run.model.parameters())  # the GPT-2's, its tied embedding once
    assert table.steps.tolist() == STEPS and table.params.tolist() == [float(count)] * len(STEPS)


# ---------------------------------------------------------------------- the same numbers, the same errors
def test_the_same_weights_give_the_same_numbers_in_both_adapters(probe, tmp_path):
    vectors = [H.plain_vector(probe, "a"), H.plain_vector(probe, "b", seed=1)]
    runs = {}
    for name, cls in DRIVERS.items():
        driver = cls()
        # lr=0: both trainers keep the initial weights, identical in both frameworks.
        runs[name] = driver.train(tmp_path / name, driver.make(vectors, probe, save_dir=tmp_path / name / "store"),
                                  lr=0.0)
    lightning, hf = runs["lightning"], runs["hf"]
    for (key, a), b in zip(lightning.model.state_dict().items(), hf.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert lightning.history == hf.history  # the evaluator's own numbers, bit for bit
    assert sorted(lightning.metrics) == sorted(hf.metrics) == STEPS
    for step in STEPS:
        assert set(lightning.metrics[step]) == set(hf.metrics[step])
        for key, value in hf.metrics[step].items():
            if not key.endswith("eval_seconds"):
                # Lightning's self.log stores floats as float32 tensors; HF logs the float itself.
                assert np.float32(lightning.metrics[step][key]) == np.float32(value), key
    stores = [load_losses(run.save_dir, fingerprint=probe.fingerprint) for run in (lightning, hf)]
    np.testing.assert_array_equal(stores[0].losses, stores[1].losses)


def _error(make) -> tuple[type, str]:
    with pytest.raises(Exception) as caught:  # noqa: PT011  (the two adapters' errors are compared below)
        make()
    return caught.type, str(caught.value)


def test_constructors_reject_the_same_bad_arguments_with_the_same_error(probe, tmp_path):
    vector = H.plain_vector(probe)
    other = H.make_probe(n_texts=3)
    unrecorded = SalienceVector(weights=vector.weights, link=vector.link, task="x", tokenizer_hash=probe.tokenizer_hash)
    bad = {
        "batch_size=True": ((vector, probe), {"batch_size": True}),
        "batch_size=0": ((vector, probe), {"batch_size": 0}),
        "batch_size=1.5": ((vector, probe), {"batch_size": 1.5}),
        "prefix=''": ((vector, probe), {"prefix": ""}),
        "prefix='csv/'": ((vector, probe), {"prefix": "csv/"}),
        "save_dir=3": ((vector, probe), {"save_dir": 3}),
        "no vector, no save_dir": (([], probe), {}),
        "duplicate tasks": (([vector, H.plain_vector(probe, seed=1)], probe), {}),
        "a vector of another probe": ((vector, other), {}),
        "a vector of none of several probes": ((vector, [other, H.make_probe(n_texts=2)]), {}),
        "a vector recording no probe, two probes": ((unrecorded, [probe, other]), {}),
        "not a vector": (([vector.weights], probe), {}),
        "no probe": ((vector, []), {}),
        "not a probe": ((vector, 42), {}),
        "a probe file that does not exist": ((vector, tmp_path / "missing.safetensors"), {}),
    }
    for case, (args, kw) in bad.items():
        errors = {}
        for name, cls in DRIVERS.items():
            kind, message = _error(lambda cls=cls, args=args, kw=kw: cls.adapter(*args, **kw))
            errors[name] = (kind, message.replace(cls.adapter.__name__, "<adapter>"))
        assert errors["lightning"] == errors["hf"], case
        kind, message = errors["hf"]
        if kind is FileNotFoundError:  # named by its path
            assert "missing.safetensors" in message
        else:  # says whose argument was wrong
            assert issubclass(kind, ValueError) and "<adapter>" in message, case
    # The same good arguments are accepted by both, paths as well as objects.
    vector.save(tmp_path / "v.safetensors")
    probe.save(tmp_path / "p.safetensors")
    for cls in DRIVERS.values():
        cb = cls.adapter(str(tmp_path / "v.safetensors"), tmp_path / "p.safetensors", batch_size=3, prefix="x")
        assert [v.task for v in cb.vectors] == ["plumb"] and cb.probes[0].fingerprint == probe.fingerprint
        assert cb.prefix == "x" and cb.save_dir is None and cb.history == []


# ---------------------------------------------------------------------- faults
def test_nan_losses_warn_log_nan_flagged_extrapolating_and_training_continues(driver, probe, tmp_path):
    cb = driver.make(H.plain_vector(probe), probe, save_dir=tmp_path / "store")
    n = probe.n_tokens
    expected = (rf"{driver.adapter.__name__}: {n} of {n} probe token losses are NaN/inf at step 4 .*logged as NaN "
                r"with extrapolating=1\.0")
    with pytest.warns(RuntimeWarning, match=expected):
        run = driver.train(tmp_path, cb, steps=6, poison_at=3)
    assert run.global_step == 6 and sorted(run.metrics) == [2, 4, 6]
    assert math.isfinite(run.metrics[2]["csv/plumb/pred"]) and run.metrics[2]["csv/nonfinite_losses"] == 0
    for step in (4, 6):
        metrics = run.metrics[step]
        assert math.isnan(metrics["csv/plumb/pred"]) and math.isnan(metrics["csv/plumb/weighted_loss"])
        assert metrics["csv/plumb/extrapolating"] == 1.0 and metrics["csv/nonfinite_losses"] == n
    assert [r["extrapolating"] for r in run.history] == [False, True, True]
    assert load_losses(run.save_dir).steps.tolist() == [2]  # NaN losses are not saved


def test_a_save_dir_of_another_probe_fails_before_training(driver, probe, tmp_path):
    other = H.make_probe(n_texts=3)
    LossStore(tmp_path / "store", other)
    cb = driver.make(H.plain_vector(probe), probe, save_dir=tmp_path / "store")
    expected = (rf"{driver.adapter.__name__}\(save_dir=.*\): .* holds losses of probe {other.fingerprint}, not of "
                rf"probe {probe.fingerprint}; use a new directory")
    with pytest.raises(ProbeMismatchError, match=expected):
        driver.train(tmp_path, cb)
    assert driver.global_step == 0


def test_a_save_dir_of_another_run_fails_before_training(driver, probe, tmp_path):
    first = driver.make(H.plain_vector(probe), probe, save_dir=tmp_path / "store")
    driver.train(tmp_path / "first", first, steps=2)
    before = load_losses(tmp_path / "store")
    assert before.steps.tolist() == [2]
    second = driver.make(H.plain_vector(probe), probe, save_dir=tmp_path / "store")
    expected = (rf"{driver.adapter.__name__}\(save_dir=.*\): .* holds the losses of run '{first.evaluator.run_id}'.* "
                r"A fresh run needs a save_dir of its own")
    with pytest.raises(RunMismatchError, match=expected):
        driver.train(tmp_path / "second", second)
    assert driver.global_step == 0
    after = load_losses(tmp_path / "store")
    assert after.names == before.names
    np.testing.assert_array_equal(after.losses, before.losses)


# ---------------------------------------------------------------------- DDP: 2 CPU ranks
@pytest.fixture(scope="module", params=sorted(DRIVERS))
def ddp_out(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"ddp_{request.param}")
    proc = subprocess.run(ddp_command(request.param, out), capture_output=True, text=True, timeout=600,
                          env=subprocess_env(), cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_ddp_shards_the_probe_and_every_rank_logs_the_single_process_values(ddp_out):
    ranks = [json.loads((ddp_out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        for metrics in rank["metrics"].values():
            metrics.pop("csv/eval_seconds")  # each rank's own time
    assert sorted(int(s) for s in ranks[0]["metrics"]) == STEPS
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # exactly equal, so early-stopping decisions agree
    assert ranks[0]["history"] == ranks[1]["history"]

    model = tiny_gpt2(len(H.tokenizer()), n_positions=64)
    load_model(model, str(ddp_out / "model.safetensors"))
    final = ranks[0]["metrics"]["4"]
    for name, expected in zip("abc", ddp_probes(), strict=True):
        probe = ProbeSet.load(ddp_out / f"probe_{name}.safetensors")
        assert probe.fingerprint == expected.fingerprint
        vector = SalienceVector.load(ddp_out / f"vector_{name}.safetensors")
        losses = token_losses(model, probe)
        assert final[f"csv/{name}/pred"] == pytest.approx(vector.predict(losses), abs=1e-5)
        assert final[f"csv/{probe.fingerprint}/probe_mean_loss"] == pytest.approx(float(losses.mean()), abs=1e-5)
        # Only rank 0 wrote the store: the gathered losses, in probe order.
        table = load_losses(ddp_out / "store" / probe.fingerprint, fingerprint=probe.fingerprint)
        assert table.steps.tolist() == STEPS
        np.testing.assert_allclose(table.losses[-1], losses.numpy(), atol=1e-5)
        # Each rank scored its own shard, in as many forward passes as the other rank, and together all of it.
        scored = [[i for batch in rank["forwards"][probe.fingerprint] for i in batch] for rank in ranks]
        assert len(ranks[0]["forwards"][probe.fingerprint]) == len(ranks[1]["forwards"][probe.fingerprint]) > 0
        assert set(scored[0]) | set(scored[1]) == set(range(probe.num_sequences))
        if probe.num_sequences > 1:
            assert not set(scored[0]) & set(scored[1])
