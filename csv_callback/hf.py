"""Predicted benchmark scores as evaluation metrics of a Hugging Face ``transformers.Trainer``.

At every evaluation the callback computes the probe's per-token losses and adds, for each salience vector,
``<prefix>_csv/<task>/pred`` (and ``.../weighted_loss``, ``.../extrapolating``, ``<prefix>_csv/probe_mean_loss``,
``<prefix>_csv/nonfinite_losses``, ``<prefix>_csv/eval_seconds``: the names of the Lightning
``SalienceCallback``) to the evaluation metrics, where ``<prefix>`` is the Trainer's metric prefix (``eval``).
So ``TrainingArguments(metric_for_best_model="csv/<task>/pred", greater_is_better=True)`` and
``EarlyStoppingCallback`` select and stop on the predicted score.

How it reaches everything: ``Trainer.evaluate`` calls ``log(metrics)`` and then ``on_evaluate(metrics)``
with the same dict, and returns that dict to the best-model logic. The callback adds its entries in
``on_log`` when it sees evaluation metrics, so later callbacks, ``on_evaluate`` (EarlyStoppingCallback),
``metric_for_best_model`` and ``state.log_history`` all see them. The ``report_to`` trackers (W&B,
TensorBoard, ...) are callbacks that run before user callbacks, so for them to receive the scores the
callback must run first: attach it with ``SalienceTrainerCallback(...).attach(trainer)``.

Under DDP every rank computes the whole probe (the model is the same on every rank, so every rank gets the
same prediction and early-stopping decisions agree); only the main process writes ``save_dir``.

Faults are handled as in the Lightning callback, with the same code (``_faults.py``): what can be checked
before training (tokenizer, the probe against the model's context window and vocabulary, ``save_dir``) fails in
``on_train_begin`` with a message saying how to fix it; inside ``train()`` NaN/inf losses, losses that
cannot be computed and failed saves warn (``RuntimeWarning``) and training goes on, the predictions of
such an evaluation logged as NaN with ``extrapolating`` 1.0.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from . import _faults
from .losses import token_losses
from .probe import ProbeSet
from .salience import SalienceVector
from .store import LossStore

_OWNER = "SalienceTrainerCallback"


class SalienceTrainerCallback(TrainerCallback):
    """Add predicted downstream scores to a ``transformers.Trainer``'s evaluation metrics.

    Args:
        vectors: SalienceVector objects or paths to their .safetensors files; tasks must be distinct.
        probe: the vectors' ProbeSet, or a path to it.
        batch_size: probe sequences per forward pass.
        save_dir: optional loss store directory (the format of ``csv-callback collect``): each evaluated
            step's per-token losses are saved there as ``step-<global_step:09d>``, as the Lightning callback does.
            It is opened (and checked) when training begins: a directory holding another probe's losses, or a
            path that is not a writable directory, fails before the first step.
    """

    def __init__(
        self,
        vectors: Sequence[SalienceVector | str | os.PathLike],
        probe: ProbeSet | str | os.PathLike,
        batch_size: int = 8,
        save_dir: str | os.PathLike | None = None,
    ) -> None:
        if isinstance(vectors, (SalienceVector, str, os.PathLike)):
            vectors = [vectors]
        self.vectors = [v if isinstance(v, SalienceVector) else SalienceVector.load(v) for v in vectors]
        if not self.vectors:
            raise ValueError("SalienceTrainerCallback needs at least one salience vector.")
        tasks = [sv.task for sv in self.vectors]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"vectors must have distinct tasks (they name the metrics), got {tasks}.")
        self.probe = probe if isinstance(probe, ProbeSet) else ProbeSet.load(probe)
        for sv in self.vectors:
            sv.check_probe(self.probe)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.batch_size = batch_size
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self._store: LossStore | None = None
        self._attached = False
        self._cache: tuple[int, dict[str, float]] | None = None
        self._model_checked = False
        self._training = False  # between on_train_begin and on_train_end: faults warn instead of raising

    def attach(self, trainer: Any) -> Any:
        """Put this callback first in ``trainer``'s callbacks, so the ``report_to`` trackers log its metrics."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._attached = True
        return trainer

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        # Whatever would make the evaluations fail or meaningless fails now, before any training step.
        if processing_class is not None and hasattr(processing_class, "get_vocab"):
            self.probe.check_tokenizer(processing_class)
        if model is not None:
            self._check_model(model)
        if self.save_dir is not None and state.is_world_process_zero and self._store is None:
            self._store = _faults.open_loss_store(self.save_dir, self.probe, _OWNER, self.save_dir)
        self._training = True
        report_to = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
        trackers = [t for t in report_to if t != "none"]
        if trackers and not self._attached and state.is_world_process_zero:
            warnings.warn(
                f"SalienceTrainerCallback was not attached first, so the report_to trackers {trackers} will not "
                "receive the predicted scores (metric_for_best_model and EarlyStoppingCallback still will); "
                "use SalienceTrainerCallback(...).attach(trainer).",
                stacklevel=2,
            )

    def on_train_end(self, args, state, control, **kwargs):
        # load_best_model_at_end swaps the weights without a new step: the next evaluation must recompute.
        self._cache = None
        self._training = False

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        prefix = _eval_prefix(logs)
        if prefix is None or model is None:
            return
        added = self._metrics(model, state, prefix)
        logs.update(added)
        # Trainer.log appended a copy of these logs to the history before calling us.
        runtime = f"{prefix}_runtime"
        if state.log_history and state.log_history[-1].get(runtime) == logs[runtime]:
            state.log_history[-1].update(added)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        # Normally on_log has filled ``metrics`` already; this covers trainers that evaluate without logging.
        prefix = _eval_prefix(metrics)
        if prefix is not None and model is not None and f"{prefix}_csv/probe_mean_loss" not in metrics:
            metrics.update(self._metrics(model, state, prefix))

    # ------------------------------------------------------------------ computation
    def _metrics(self, model: torch.nn.Module, state, prefix: str) -> dict[str, float]:
        """The callback's metrics for the model at ``state.global_step``, computed once per step (one
        evaluation over several eval datasets logs once per dataset)."""
        if self._cache is None or self._cache[0] != state.global_step:
            self._cache = (state.global_step, self._compute(model, state))
        return {f"{prefix}_{k}": v for k, v in self._cache[1].items()}

    def _check_model(self, model: torch.nn.Module) -> None:
        """Fail if ``model`` cannot score the probe (see :func:`~csv_callback._faults.check_scores_probe`)."""
        if not self._model_checked:
            _faults.check_scores_probe(model, self.probe, _OWNER, "the Trainer's model")
            self._model_checked = True

    def _compute(self, model: torch.nn.Module, state) -> dict[str, float]:
        start = time.perf_counter()
        self._check_model(model)  # done by on_train_begin in a run; a bare evaluate() fails here, before any compute
        step = state.global_step
        try:
            losses = token_losses(model, self.probe, batch_size=self.batch_size)
        except Exception as e:  # inside a run, hours of training matter more than one evaluation's predictions
            if not self._training:
                raise
            _warn(_faults.losses_failed_message(_OWNER, self.probe, step, e))
            losses = None
        mean_loss, n_bad = _faults.loss_summary(losses)
        out: dict[str, float] = {}
        for sv in self.vectors:
            pred, wl, extrapolating = _faults.prediction(sv, _faults.usable(losses, n_bad))
            out |= {f"csv/{sv.task}/pred": pred, f"csv/{sv.task}/weighted_loss": wl,
                    f"csv/{sv.task}/extrapolating": float(extrapolating)}
        out["csv/probe_mean_loss"] = mean_loss
        out["csv/nonfinite_losses"] = n_bad
        if losses is not None and state.is_world_process_zero:
            if n_bad:
                _warn(_faults.nonfinite_message(_OWNER, int(n_bad), self.probe, step, "csv/nonfinite_losses"))
            elif self.save_dir is not None:
                self._save(losses, state)
        out["csv/eval_seconds"] = time.perf_counter() - start
        return out

    def _save(self, losses: torch.Tensor, state) -> None:
        if self._store is None:  # a bare evaluate(), without on_train_begin: a bad save_dir raises here
            self._store = _faults.open_loss_store(self.save_dir, self.probe, _OWNER, self.save_dir)
        store, step = self._store, state.global_step
        seen = float(state.num_input_tokens_seen) if state.num_input_tokens_seen else None
        # A full disk must not stop training; rows already saved stay intact (atomic writes).
        _faults.guarded(f"save the probe losses of step {step} to {store.root}",
                        lambda: store.write(f"step-{step:09d}", losses, step=step, tokens_seen=seen),
                        owner=_OWNER, warn=_warn)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _eval_prefix(logs: dict[str, Any] | None) -> str | None:
    """The metric prefix (``eval``, ``eval_<dataset>``) if ``logs`` are evaluation metrics, else None."""
    if not logs:
        return None
    for key in logs:
        if key.endswith("_runtime") and not key.startswith("train"):
            return key[: -len("_runtime")]
    return None
