"""Domain vectors in the training loop (issue 15, item 2): predictions from the validation losses the loop logs
itself, with no forward pass of their own, in Lightning (several validation dataloaders), in the HF Trainer (a dict
of eval datasets), in a plain loop, through faults and through a resume from a real checkpoint."""

from __future__ import annotations

import math
import warnings

import adapter_drivers as D
import lightning_helpers as H
import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from transformers import Trainer, TrainingArguments

from csv_callback import SalienceVector, SigmoidLink
from csv_callback.callback import SalienceCallback
from csv_callback.evaluator import SalienceEvaluator
from csv_callback.hf import SalienceTrainerCallback

DOMAINS = ("a", "b")
LIGHTNING_METRICS = {"a": "val/a/loss", "b": "val/b/loss"}
HF_METRICS = {"a": "eval_a_loss", "b": "eval_b_loss"}
FIELDS = ("pred", "pred_lo", "pred_hi", "weighted_loss", "extrapolating", "forecast", "forecast_lo", "forecast_hi")


def domain_vector(task: str = "dom") -> SalienceVector:
    """A hand-built vector over the domains a and b, whose loss range covers the tiny GPT-2's losses (about 6)."""
    return SalienceVector(
        weights=np.array([0.3, 0.7]), link=SigmoidLink(lo=0.0, hi=1.0, k=1.5, L0=5.0), task=task, metric="acc",
        loss_range=(4.0, 7.0), domains=DOMAINS,
        fit_report={"interval": {"method": "split-conformal", "abs_residuals": [0.01 * i for i in range(1, 21)]}},
    )


def val_blocks() -> tuple[torch.Tensor, torch.Tensor]:
    """Two held-out sets of 8 token blocks ``[8, BLOCK]``, one per domain, with different losses."""
    blocks = H.loaders(n_val=16)[1].dataset.tensors[0]
    return blocks[:8], blocks[8:]


# ---------------------------------------------------------------------- Lightning
class DomainLM(H.TinyLM):
    """TinyLM validated on two dataloaders, logging ``val/a/loss`` and ``val/b/loss`` from ``validation_step``.

    ``logged[global_step]`` records the values it logged at each validation (one batch per dataloader, so the epoch
    value is that batch's loss). ``forwards`` counts every forward of the GPT-2 and ``own_forwards`` the ones its own
    training and validation steps made. From step ``nan_from`` on, domain b's loss is NaN; ``drop`` is never logged.
    """

    def __init__(self, nan_from: int | None = None, drop: str | None = None, **kw):
        super().__init__(**kw)
        self.nan_from, self.drop = nan_from, drop
        self.logged: dict[int, dict[str, float]] = {}
        self.forwards = self.own_forwards = 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, *args) -> None:
        self.forwards += 1

    def training_step(self, batch, batch_idx):
        self.own_forwards += 1
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.own_forwards += 1
        name = DOMAINS[dataloader_idx]
        loss = self._loss(batch)
        if name == "b" and self.nan_from is not None and self.global_step >= self.nan_from:
            loss = loss * math.nan
        if name == self.drop:
            return
        self.log(f"val/{name}/loss", loss, add_dataloader_idx=False)
        if not self.trainer.sanity_checking:
            self.logged.setdefault(self.global_step, {})[f"val/{name}/loss"] = float(loss)


class Record(Callback):
    """What the loggers and EarlyStopping received at each validation of ``fit``: ``seen[step][name]``."""

    def __init__(self):
        self.seen: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def fit(tmp_path, callback, module=None, max_steps: int = 6, ckpt_path=None, extra=(), version: int = 0):
    """Train ``module`` (a fresh DomainLM) with ``callback``, validating on both domains every 2 steps."""
    module = DomainLM() if module is None else module
    record = Record()
    train = H.loaders()[0]
    vals = [DataLoader(TensorDataset(b), batch_size=8) for b in val_blocks()]
    logger = H.pl.loggers.CSVLogger(str(tmp_path), name="csv", version=version)
    t = H.trainer(tmp_path, [callback, record, *extra], max_steps=max_steps, logger=logger,
                  enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra))
    t.fit(module, train, vals, ckpt_path=ckpt_path)
    return t, module, record.seen


def expected(vector: SalienceVector, logged: dict[str, float], mapping: dict[str, str]) -> float:
    return float(vector.predict(vector.domain_losses({d: logged[m] for d, m in mapping.items()})))


def test_lightning_predicts_each_validation_from_its_own_domain_losses_without_a_forward(tmp_path):
    vector = domain_vector()
    cb = SalienceCallback(vector, None, model_attr="model", domain_metrics=LIGHTNING_METRICS)
    assert cb.probes == []
    t, module, seen = fit(tmp_path, cb)
    assert t.global_step == 6 and sorted(seen) == sorted(module.logged) == [2, 4, 6]
    preds = []
    for step, logged in module.logged.items():
        m = seen[step]
        assert {f"csv/dom/{f}" for f in FIELDS} <= set(m)
        assert m["csv/dom/pred"] == pytest.approx(expected(vector, logged, LIGHTNING_METRICS), abs=1e-6)
        wl = 0.3 * logged["val/a/loss"] + 0.7 * logged["val/b/loss"]
        assert m["csv/dom/weighted_loss"] == pytest.approx(wl, abs=1e-5)
        assert m["csv/dom/pred_lo"] < m["csv/dom/pred"] < m["csv/dom/pred_hi"]
        assert m["csv/dom/extrapolating"] == 0.0 and math.isfinite(m["csv/dom/forecast"])
        assert m["csv/nonfinite_losses"] == 0.0 and "csv/probe_mean_loss" not in m
        preds.append(m["csv/dom/pred"])
    # Fresh at every validation: the model trains, so each validation's losses, and prediction, differ.
    assert len(set(preds)) == 3
    # The CSVLogger file holds the same predictions (Lightning logs validation metrics at global_step - 1).
    assert list(H.read_csv_metrics(tmp_path / "csv/version_0", "csv/dom/pred").values()) == pytest.approx(preds)
    # Every forward of the GPT-2 was a training or validation step of the module (sanity check included).
    assert module.forwards == module.own_forwards == 6 + 2 + 3 * 2
    assert [r["step"] for r in cb.history] == [2, 4, 6]


def test_a_mixed_callback_logs_the_token_and_the_domain_vectors(tmp_path):
    probe = H.make_probe(n_texts=2)
    token, vector = H.plain_vector(probe, "tok"), domain_vector()
    cb = SalienceCallback([token, vector], probe, model_attr="model", domain_metrics=LIGHTNING_METRICS)
    module, probe_forwards = DomainLM(), D.ProbeForwards([probe])
    probe_forwards(module.model)
    _, module, seen = fit(tmp_path, cb, module=module, max_steps=4)
    for step, logged in module.logged.items():
        m = seen[step]
        assert {f"csv/{task}/{f}" for task in ("tok", "dom") for f in FIELDS} <= set(m)
        assert m["csv/dom/pred"] == pytest.approx(expected(vector, logged, LIGHTNING_METRICS), abs=1e-6)
        assert math.isfinite(m["csv/tok/pred"]) and math.isfinite(m["csv/probe_mean_loss"])
    # The forwards beyond the module's own are the token vector's probe, which the domain vector does not add to:
    # the model check's two and one batch of the probe's sequences per validation.
    assert probe.num_sequences <= 8
    assert module.forwards - module.own_forwards == len(probe_forwards.batches[probe.fingerprint]) == 2 + 2


# ---------------------------------------------------------------------- faults
def test_a_metric_never_logged_fails_the_first_validation_naming_the_logged_ones(tmp_path):
    cb = SalienceCallback(domain_vector(), None, model_attr="model",
                          domain_metrics={"a": "val/a/loss", "b": "val/b_loss"})
    with pytest.raises(ValueError, match=r"\{'b': 'val/b_loss'\}.*not among the metrics logged at step 2") as e:
        fit(tmp_path, cb)
    assert "'val/a/loss'" in str(e.value) and "'val/b/loss'" in str(e.value)


def test_a_nan_domain_loss_warns_logs_nan_and_training_goes_on(tmp_path):
    vector = domain_vector()
    cb = SalienceCallback(vector, None, model_attr="model", domain_metrics=LIGHTNING_METRICS)
    with pytest.warns(RuntimeWarning, match=r"no finite loss for domain\(s\) \['b'\] at step 4"):
        t, module, seen = fit(tmp_path, cb, module=DomainLM(nan_from=4))
    assert t.global_step == 6
    assert seen[2]["csv/dom/pred"] == pytest.approx(expected(vector, module.logged[2], LIGHTNING_METRICS), abs=1e-6)
    for step in (4, 6):
        assert math.isnan(seen[step]["csv/dom/pred"]) and math.isnan(seen[step]["csv/dom/forecast"])
        assert seen[step]["csv/dom/extrapolating"] == 1.0
    assert [r["step"] for r in cb.history] == [2, 4, 6]
    assert cb.history[0]["pred"] == pytest.approx(seen[2]["csv/dom/pred"]) and math.isnan(cb.history[1]["pred"])


@pytest.mark.parametrize("adapter", [SalienceCallback, SalienceTrainerCallback])
@pytest.mark.parametrize(
    ("vectors", "kwargs", "match"),
    [
        ("domain", {"domain_metrics": {"a": "m"}}, r"exactly the domains .*\['a', 'b'\]; missing \['b'\], not a "
                                                   r"domain of any vector \[\]"),
        ("domain", {"domain_metrics": {"a": "m", "b": "n", "c": "o"}}, r"missing \[\], not a domain of any vector "
                                                                       r"\['c'\]"),
        ("domain", {}, r"domain_metrics=...\) must map each domain name .*'val/a/loss'.*got None"),
        ("token", {"domain_metrics": {"a": "m"}}, r"is given, but no vector is a domain vector"),
        ("token", {"probe": None}, r"probe=...\) is empty; pass at least one \(token vectors and save_dir need the "
                                   "probe"),
    ],
)
def test_constructor_errors(adapter, vectors, kwargs, match):
    probe = H.make_probe(n_texts=1)
    vector = domain_vector() if vectors == "domain" else H.plain_vector(probe)
    kwargs = {"probe": None if vectors == "domain" else probe, **kwargs}
    with pytest.raises(ValueError, match=match):
        adapter(vector, **kwargs)


# ---------------------------------------------------------------------- HF Trainer
def hf_trainer(tmp_path, callback, max_steps: int = 6, **args) -> Trainer:
    model = H.TinyLM().model
    train = H.loaders()[0]
    a, b = (D._Blocks(DataLoader(TensorDataset(x), batch_size=8)) for x in val_blocks())
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=3e-3, eval_strategy="steps", eval_steps=2, logging_strategy="no", report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, max_steps=max_steps, **({"save_strategy": "no"} | args))
    return Trainer(model=model, args=args, train_dataset=D._Blocks(train), eval_dataset={"a": a, "b": b},
                   processing_class=H.tokenizer(), callbacks=[callback])


def test_hf_adds_the_prediction_once_per_evaluation_and_selects_the_best_model_by_it(tmp_path):
    vector = domain_vector()
    cb = SalienceTrainerCallback(vector, None, domain_metrics=HF_METRICS)
    trainer = hf_trainer(tmp_path, cb, save_strategy="steps", save_steps=2, metric_for_best_model="csv/dom/pred",
                         greater_is_better=True)
    trainer.train()
    evals = [h for h in trainer.state.log_history if any(k.endswith("_runtime") for k in h)]
    by_step: dict[int, dict[str, float]] = {}
    for h in evals:
        by_step.setdefault(h["step"], {}).update(h)
    assert sorted(by_step) == [2, 4, 6]
    # Added once per evaluation, to the metrics of the dataset that completed the domains (b, evaluated last).
    assert sum("eval_csv/dom/pred" in h for h in evals) == 3
    assert all("eval_csv/dom/pred" in h for h in evals if "eval_b_loss" in h)
    preds = {}
    for step, m in by_step.items():
        assert {f"eval_csv/dom/{f}" for f in FIELDS} <= set(m)
        assert m["eval_csv/dom/pred"] == pytest.approx(expected(vector, m, HF_METRICS), abs=1e-6)
        assert m["eval_csv/dom/extrapolating"] == 0.0 and math.isfinite(m["eval_csv/dom/forecast"])
        preds[step] = m["eval_csv/dom/pred"]
    assert len(set(preds.values())) == 3
    best = max(preds, key=preds.get)
    assert trainer.state.best_metric == pytest.approx(preds[best], abs=1e-9)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    # After training, trainer.evaluate() returns them with the losses they were predicted from.
    metrics = trainer.evaluate()
    assert metrics["eval_csv/dom/pred"] == pytest.approx(expected(vector, metrics, HF_METRICS), abs=1e-6)
    assert metrics["eval_csv/dom/pred"] == pytest.approx(preds[6], abs=1e-6)  # the weights of step 6


def test_hf_a_metric_never_logged_fails_at_the_next_step(tmp_path):
    cb = SalienceTrainerCallback(domain_vector(), None, domain_metrics={"a": "eval_a_loss", "b": "eval_c_loss"})
    trainer = hf_trainer(tmp_path, cb)
    with pytest.raises(ValueError, match=r"\{'b': 'eval_c_loss'\}.*not among the metrics logged at step 2") as e:
        trainer.train()
    assert "'eval_a_loss'" in str(e.value) and "'eval_b_loss'" in str(e.value)
    assert trainer.state.global_step == 2


# ---------------------------------------------------------------------- plain loop
def test_a_plain_loop_predicts_from_the_losses_it_passes():
    vector = domain_vector()
    metrics = {"loss/a": 6.0, "loss/b": 5.5}
    evaluator = SalienceEvaluator([vector], None, domain_metrics={"a": "loss/a", "b": "loss/b"})
    with pytest.raises(ValueError, match=r"\{'b': 'loss/b'\}.*not among the metrics logged at step 1: \['loss/a'\]"):
        evaluator.evaluate(None, 1, training=True, logged={"loss/a": 6.0})
    out = evaluator.evaluate(None, 2, training=True, logged=metrics, end_step=10).metrics
    assert out["csv/dom/pred"] == pytest.approx(float(vector.predict(np.array([6.0, 5.5]))), abs=1e-12)
    assert out["csv/dom/weighted_loss"] == pytest.approx(0.3 * 6.0 + 0.7 * 5.5)
    assert {f"csv/dom/{f}" for f in FIELDS} <= set(out)
    # Tensors as a framework logs them; other values at the same step are a new evaluation, not the cached one.
    again = evaluator.evaluate(None, 2, training=True, logged={"loss/a": torch.tensor(5.0), "loss/b": 5.0}).metrics
    assert again["csv/dom/weighted_loss"] == pytest.approx(5.0)
    with pytest.warns(RuntimeWarning, match=r"missing: \['b'\]"):
        later = evaluator.evaluate(None, 4, training=True, logged={"loss/a": 6.0}).metrics
    assert math.isnan(later["csv/dom/pred"]) and later["csv/dom/extrapolating"] == 1.0
    assert [r["step"] for r in evaluator.history] == [2, 4]


# ---------------------------------------------------------------------- resume
def domain_callback() -> SalienceCallback:
    return SalienceCallback(domain_vector(), None, model_attr="model", domain_metrics=LIGHTNING_METRICS)


def test_a_resumed_run_continues_the_domain_history_and_warns_for_a_metric_gone_missing(tmp_path):
    def ckpt():  # written when each validation ends, after the callback's evaluation
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)

    first = domain_callback()
    with pytest.raises(RuntimeError, match="node lost"):
        fit(tmp_path, first, max_steps=8, extra=[ckpt(), H.CrashAt(5)])
    assert [r["step"] for r in first.history] == [2, 4]
    cb = domain_callback()
    # The resumed module no longer logs domain b. The restored history shows the mapping worked, so this is a
    # metric gone missing (a warning and NaN), not the first validation's configuration error.
    with pytest.warns(RuntimeWarning, match=r"no finite loss for domain\(s\) \['b'\] at step 6 \(missing: \['b'\]"):
        t, _, seen = fit(tmp_path, cb, module=DomainLM(drop="b"), max_steps=8, extra=[ckpt()], version=1,
                         ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert t.global_step == 8 and sorted(seen) == [6, 8]
    assert [r["step"] for r in cb.history] == [2, 4, 6, 8] and cb.history[:2] == first.history
    assert all(math.isnan(seen[s]["csv/dom/pred"]) and seen[s]["csv/dom/extrapolating"] == 1.0 for s in (6, 8))


def test_a_validation_cut_short_leaves_a_gap_not_a_false_error_on_resume(tmp_path):
    from test_callback_runs import KillDuringValidationAt

    def ckpt():  # written in the step, before that step's validation
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, save_last=True)

    with pytest.raises(RuntimeError, match="node lost"):
        fit(tmp_path, domain_callback(), max_steps=8, extra=[ckpt(), KillDuringValidationAt(2)])
    cb = domain_callback()
    # The checkpoint holds step 2, whose validation never logged its domain losses: nothing to predict from, so the
    # step stays a gap (a token vector's would be evaluated now), and this is not the first validation's error.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(never evaluated|no finite loss).*")
        _, module, seen = fit(tmp_path, cb, max_steps=8, extra=[ckpt()], version=1,
                              ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [r["step"] for r in cb.history] == sorted(seen) == [4, 6, 8]
    vector = cb.vectors[0]
    for step in (4, 6, 8):
        assert seen[step]["csv/dom/pred"] == pytest.approx(
            expected(vector, module.logged[step], LIGHTNING_METRICS), abs=1e-6)
