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
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from .losses import token_losses
from .probe import ProbeSet
from .salience import SalienceVector
from .store import LossStore


class SalienceTrainerCallback(TrainerCallback):
    """Add predicted downstream scores to a ``transformers.Trainer``'s evaluation metrics.

    Args:
        vectors: SalienceVector objects or paths to their .safetensors files; tasks must be distinct.
        probe: the vectors' ProbeSet, or a path to it.
        batch_size: probe sequences per forward pass.
        save_dir: optional loss store directory (the format of ``csv-callback collect``): each evaluated
            step's per-token losses are saved there as ``step-<global_step:09d>``, as the Lightning callback does.
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
        self.save_dir = save_dir
        self._store: LossStore | None = None
        self._attached = False
        self._cache: tuple[int, dict[str, float]] | None = None

    def attach(self, trainer: Any) -> Any:
        """Put this callback first in ``trainer``'s callbacks, so the ``report_to`` trackers log its metrics."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._attached = True
        return trainer

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, processing_class=None, **kwargs):
        # A wrong tokenizer would make every prediction meaningless: fail before any training step.
        if processing_class is not None and hasattr(processing_class, "get_vocab"):
            self.probe.check_tokenizer(processing_class)
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

    def _compute(self, model: torch.nn.Module, state) -> dict[str, float]:
        start = time.perf_counter()
        losses = token_losses(model, self.probe, batch_size=self.batch_size)
        out: dict[str, float] = {}
        n_bad = int((~torch.isfinite(losses)).sum())
        finite = n_bad == 0
        if not finite and state.is_world_process_zero:
            # Inside a training run: warn and keep training rather than kill hours of compute.
            warnings.warn(f"step {state.global_step}: {n_bad} probe token losses are NaN/inf; the predicted scores "
                          "are logged as NaN.", stacklevel=2)
        for sv in self.vectors:
            if finite:
                wl = float(sv.weighted_loss(losses.numpy()))
                out[f"csv/{sv.task}/pred"] = float(sv.link(wl))
                out[f"csv/{sv.task}/weighted_loss"] = wl
                out[f"csv/{sv.task}/extrapolating"] = float(sv.extrapolates(wl))
            else:
                out[f"csv/{sv.task}/pred"] = out[f"csv/{sv.task}/weighted_loss"] = math.nan
                out[f"csv/{sv.task}/extrapolating"] = 1.0
        out["csv/probe_mean_loss"] = float(losses.double().mean())
        out["csv/nonfinite_losses"] = float(n_bad)
        if self.save_dir is not None and state.is_world_process_zero and finite:
            self._save(losses, state)
        out["csv/eval_seconds"] = time.perf_counter() - start
        return out

    def _save(self, losses: torch.Tensor, state) -> None:
        try:
            if self._store is None:
                self._store = LossStore(self.save_dir, self.probe)
            self._store.write(f"step-{state.global_step:09d}", losses, step=state.global_step,
                              tokens_seen=float(state.num_input_tokens_seen) if state.num_input_tokens_seen else None)
        except OSError as e:  # a full disk must not stop training; saved rows are intact (atomic writes)
            warnings.warn(f"could not save probe losses to {self.save_dir}: {e}", stacklevel=2)


def _eval_prefix(logs: dict[str, Any] | None) -> str | None:
    """The metric prefix (``eval``, ``eval_<dataset>``) if ``logs`` are evaluation metrics, else None."""
    if not logs:
        return None
    for key in logs:
        if key.endswith("_runtime") and not key.startswith("train"):
            return key[: -len("_runtime")]
    return None
