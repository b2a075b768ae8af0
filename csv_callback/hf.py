"""Predicted benchmark scores as evaluation metrics of a Hugging Face ``transformers.Trainer``.

At every evaluation the callback computes the probe's per-token losses and adds, for each salience vector,
``<prefix>_csv/<task>/pred`` (and ``.../pred_lo``, ``.../pred_hi``, ``.../weighted_loss``, ``.../extrapolating``,
``<prefix>_csv/probe_mean_loss``, ``<prefix>_csv/nonfinite_losses``, ``<prefix>_csv/eval_seconds``: the names of the
Lightning ``SalienceCallback``) to the evaluation metrics, where ``<prefix>`` is the Trainer's metric prefix (``eval``).
So ``TrainingArguments(metric_for_best_model="csv/<task>/pred", greater_is_better=True)`` and
``EarlyStoppingCallback`` select and stop on the predicted score.

How it reaches everything: ``Trainer.evaluate`` calls ``log(metrics)`` and then ``on_evaluate(metrics)``
with the same dict, and returns that dict to the best-model logic. The callback adds its entries in
``on_log`` when it sees evaluation metrics, so later callbacks, ``on_evaluate`` (EarlyStoppingCallback),
``metric_for_best_model`` and ``state.log_history`` all see them. The ``report_to`` trackers (W&B,
TensorBoard, ...) are callbacks that run before user callbacks, so for them to receive the scores the
callback must run first: attach it with ``SalienceTrainerCallback(...).attach(trainer)``. When the Trainer reports
to W&B (``"wandb" in args.report_to`` and a run is active), the callback adds to that run the W&B extras of
:mod:`csv_callback.wandb_view`, as the Lightning callback does: with each evaluation the table of all
predictions (``csv/predictions``) and, once per run, each vector's salience view (``csv/<task>/salience``).
The scalars keep ``WandbCallback``'s step (``train/global_step``) and W&B's default summary (the last value).

The work is done by :class:`~csv_callback.evaluator.SalienceEvaluator`, as in the Lightning callback, so the
options and behaviour are the same: several probes, collect-only (``vectors=None`` with a ``save_dir``), a
``prefix``, and under DDP the probe sharded across ranks and the losses gathered (every rank gets the same
prediction, so early-stopping decisions agree); only the main process writes ``save_dir``.

What is evaluated is named by what it is: inside ``train()`` by the step (``step-<global_step:09d>``); after it
(the usual final ``trainer.evaluate()``, or other weights loaded into the model) as a new evaluation,
``eval-<checkpoint>-step-<step>`` when the weights are the best checkpoint that ``load_best_model_at_end``
loaded, else ``eval-step-<step>``, never over a stored step. An evaluation over several eval datasets is
computed once; an evaluation of other weights at the same step is computed again.

Resume: the callback's state (its run's id, the history) rides in ``trainer_state.json`` as an
``ExportableState``, so ``train(resume_from_checkpoint=...)`` continues the same run and its ``save_dir``; a
fresh run into a ``save_dir`` of another run fails before training. Keep
``TrainingArguments(restore_callback_states_from_checkpoint=False)`` (the default): the callback restores its
own state. The Trainer writes its checkpoint after the step's evaluation, so an evaluation cut short leaves no
checkpoint of that step to resume from, and no gap.

Faults are handled as in the Lightning callback, with the same code (the evaluator): what can be checked
before training (tokenizer, the probe against the model's context window and vocabulary, ``save_dir``) fails in
``on_train_begin`` with a message saying how to fix it; inside ``train()`` NaN/inf losses, losses that
cannot be computed and failed saves warn (``RuntimeWarning``) and training goes on, the predictions of
such an evaluation logged as NaN with ``extrapolating`` 1.0.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._extras import extra_imports
from .evaluator import EvaluatorViews, SalienceEvaluator, parameter_count, torch_distributed_sharding, weights_key
from .probe import ProbeSet
from .salience import SalienceVector
from .wandb_view import WandbExtras

with extra_imports("hf", __name__):
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

_OWNER = "SalienceTrainerCallback"
PathLike = str | os.PathLike


class SalienceTrainerCallback(EvaluatorViews, TrainerCallback, ExportableState):
    """Add predicted downstream scores to a ``transformers.Trainer``'s evaluation metrics.

    Args:
        vectors: SalienceVector objects or paths to their .safetensors files; tasks must be distinct.
            ``None`` or ``[]`` with a ``save_dir`` only collects the losses.
        probe: the vectors' ProbeSet, or a path to it; a sequence of probes when the vectors use several. None when
            every vector is a domain vector.
        batch_size: probe sequences per forward pass.
        save_dir: optional loss store directory (the format of ``csv-callback collect``): each evaluated
            step's per-token losses are saved there as ``step-<global_step:09d>``, as the Lightning callback does.
            It is opened (and checked) when training begins: a directory holding another probe's or another
            run's losses, or a path that is not a writable directory, fails before the first step.
            Each evaluation records the model's parameter count (embeddings included:
            :func:`~csv_callback.evaluator.parameter_count`) and ``state.num_input_tokens_seen`` (set
            ``include_num_input_tokens_seen=True`` in the ``TrainingArguments``), the N and D of a scaling law
            (``csv-callback scaling``).
        prefix: the metrics' name prefix (after the Trainer's own ``eval_``).
        interval_level: the coverage, in (0, 1), of the prediction interval added as ``.../pred_lo`` and
            ``.../pred_hi`` (:meth:`SalienceVector.predict_interval`), and of the forecast's.
        forecast_step: the global step whose score ``.../forecast`` forecasts; None: the run's planned end,
            ``state.max_steps`` (the Trainer's ``max_steps``, or the steps its ``num_train_epochs`` make).
        domain_metrics: for domain vectors, domain name -> the evaluation metric the Trainer logs as that domain's
            loss: with ``eval_dataset={"c4": ..., "wiki": ...}`` it logs ``eval_c4_loss`` and ``eval_wiki_loss``, so
            ``{"c4": "eval_c4_loss", "wiki": "eval_wiki_loss"}``. The Trainer evaluates (and logs) one dataset after
            the other; the predictions join the metrics of the evaluation that completes the mapped losses, with
            no forward pass of their own (probe vectors' metrics then join it too), named by the Trainer's prefix
            without the dataset's (``eval_csv/<task>/pred``, not ``eval_wiki_csv/...``): ``metric_for_best_model=
            "csv/<task>/pred"`` selects on them.

    Inside ``train()`` each evaluation also adds ``.../forecast``, ``.../forecast_lo`` and ``.../forecast_hi``, the
    score the run will reach at ``forecast_step`` and its interval, by the rules of
    :class:`~csv_callback.evaluator.SalienceEvaluator` (finite from the first evaluation; forecast from the third).
    """

    def __init__(
        self,
        vectors: Sequence[SalienceVector | PathLike] | SalienceVector | PathLike | None,
        probe: Sequence[ProbeSet | PathLike] | ProbeSet | PathLike | None = None,
        batch_size: int = 8,
        save_dir: PathLike | None = None,
        prefix: str = "csv",
        interval_level: float = 0.8,
        forecast_step: int | None = None,
        domain_metrics: dict[str, str] | None = None,
    ) -> None:
        self.evaluator = SalienceEvaluator(vectors, probe, batch_size, save_dir, prefix, owner=_OWNER,
                                           interval_level=interval_level, forecast_step=forecast_step,
                                           domain_metrics=domain_metrics)
        self._attached = False
        self._model_checked = False
        self._training = False  # between on_train_begin and on_train_end: faults warn instead of raising
        self._best: tuple[tuple, str] | None = None  # (weights key, checkpoint) after load_best_model_at_end
        self._wandb = WandbExtras(self.evaluator)
        # The evaluation metrics logged so far at one step ((step, metrics)): the Trainer logs each eval dataset's
        # separately, and the domain vectors need all their domains' losses.
        self._eval_logs: tuple[int, dict[str, Any]] = (-1, {})
        self._pending = False  # an evaluation whose mapped domain losses have not all been logged yet

    @property
    def probe(self) -> ProbeSet:
        """The probe (the first one, with several)."""
        return self.evaluator.probes[0]

    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps of this callback (``transformers.trainer_callback.ExportableState``)."""
        return {"args": {}, "attributes": {"evaluator_state": self.evaluator.state_dict()}}

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
        saved = state.stateful_callbacks.get(type(self).__name__) if state.stateful_callbacks else None
        saved = saved[0] if isinstance(saved, list) and saved else saved
        if state.global_step > 0 and isinstance(saved, dict) and "evaluator_state" in saved.get("attributes", {}):
            self.evaluator.load_state_dict(saved["attributes"]["evaluator_state"])  # a resumed run
        if processing_class is not None and hasattr(processing_class, "get_vocab"):
            self.evaluator.check_tokenizer(processing_class)
        if model is not None:
            self._check_model(model)
        if state.is_world_process_zero:
            self.evaluator.open_store()
        self._training = True
        trackers = [t for t in _report_to(args) if t != "none"]
        if trackers and not self._attached and state.is_world_process_zero:
            warnings.warn(
                f"SalienceTrainerCallback was not attached first, so the report_to trackers {trackers} will not "
                "receive the predicted scores (metric_for_best_model and EarlyStoppingCallback still will); "
                "use SalienceTrainerCallback(...).attach(trainer).",
                stacklevel=2,
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._settle(model, state)
        self._training = False
        # load_best_model_at_end has put the best checkpoint's weights in the model: evaluations of them are
        # named by that checkpoint.
        self._best = None
        if args.load_best_model_at_end and state.best_model_checkpoint and model is not None:
            self._best = (weights_key(model), state.best_model_checkpoint)

    def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kwargs):
        prefix = _eval_prefix(logs)
        if prefix is None or model is None:
            return
        step, seen = self._eval_logs
        if step != state.global_step:
            self._settle(model, state)
            seen = {}
        seen = {**seen, **logs}
        self._eval_logs = (state.global_step, seen)
        wanted = self.evaluator.domain_metrics.values()
        if not all(m in seen for m in wanted):
            self._pending = True  # the next eval dataset may log the rest; see _settle
            return
        self._pending = False
        added = self._metrics(model, state, self._joined_prefix(prefix, seen), seen)
        logs.update(added)
        # Trainer.log appended a copy of these logs to the history before calling us.
        runtime = f"{prefix}_runtime"
        if state.log_history and state.log_history[-1].get(runtime) == logs[runtime]:
            state.log_history[-1].update(added)
        run = _wandb_run(args) if state.is_world_process_zero else None
        if run is not None:
            self._log_wandb(run, processing_class)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        # Normally on_log has filled ``metrics`` already; this covers trainers that evaluate without logging.
        prefix = _eval_prefix(metrics)
        if prefix is None or model is None or self._pending:
            return
        logged = {**self._eval_logs[1], **metrics}
        prefix = self._joined_prefix(prefix, logged)
        if f"{prefix}_{self.evaluator.prefix}/nonfinite_losses" not in metrics:
            metrics.update(self._metrics(model, state, prefix, logged))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._settle(model, state)

    def _joined_prefix(self, prefix: str, logged: dict[str, Any]) -> str:
        """The metric prefix of an evaluation whose domain losses came from several eval datasets: the Trainer's own
        (``eval_a``, ``eval_b`` -> ``eval``), so that ``metric_for_best_model="csv/<task>/pred"`` finds the
        predictions whichever dataset completed them. Otherwise the dataset's ``prefix``, as without domain vectors.
        """
        datasets = {k.removesuffix("_runtime") for k in logged if k.endswith("_runtime") and not k.startswith("train")}
        if not self.evaluator.domain_metrics or len(datasets) < 2:
            return prefix
        # Trainer.evaluate names each dataset's metrics f"{metric_key_prefix}_{name}"; its prefix is "eval" in train()
        return prefix.split("_", 1)[0]

    def _settle(self, model: torch.nn.Module | None, state) -> None:
        """An evaluation that ended without logging every mapped domain loss: evaluated now, so that the evaluator
        raises (its first evaluation: the mapping names metrics the Trainer does not log) or warns (later)."""
        if self._pending and model is not None:
            self._pending = False
            self._metrics(model, state, "eval", self._eval_logs[1], step=self._eval_logs[0])

    # ------------------------------------------------------------------ W&B extras
    def _log_wandb(self, run: Any, processing_class: Any) -> None:
        """The predictions table and (once) the salience views, into the row ``WandbCallback`` is about to log
        the evaluation's scalars in (this callback runs first: ``attach``)."""
        tokenizer = processing_class if hasattr(processing_class, "get_vocab") else None
        self._wandb.after_evaluation([run], tokenizer)

    # ------------------------------------------------------------------ computation
    def _check_model(self, model: torch.nn.Module) -> None:
        if not self._model_checked:
            self.evaluator.check_model(model, "the Trainer's model")
            self._model_checked = True

    def _metrics(
        self, model: torch.nn.Module, state, prefix: str, logged: dict[str, Any], step: int | None = None
    ) -> dict[str, float]:
        """The evaluator's metrics for ``model`` as it is now (at ``step``, default the state's), under the
        Trainer's metric ``prefix``; ``logged`` are the evaluation metrics the Trainer logged at that step (the
        domain vectors' input)."""
        self._check_model(model)  # done by on_train_begin in a run; a bare evaluate() fails here, before any compute
        if state.is_world_process_zero:
            self.evaluator.open_store()  # a bare evaluate() without on_train_begin: a bad save_dir raises here
        checkpoint, step = None, int(state.global_step if step is None else step)
        if not self._training and self._best is not None and self._best[0] == weights_key(model):
            checkpoint = self._best[1]
            found = re.fullmatch(r"checkpoint-(\d+)", Path(checkpoint).name)  # the Trainer's naming
            step = int(found.group(1)) if found else step
        device = next(model.parameters()).device
        evaluation = self.evaluator.evaluate(
            model, step, training=self._training, checkpoint=checkpoint,
            tokens_seen=float(state.num_input_tokens_seen) if state.num_input_tokens_seen else None,
            params=parameter_count(model), sharding=torch_distributed_sharding(device),
            end_step=state.max_steps or None, logged=logged)
        return {f"{prefix}_{k}": v for k, v in evaluation.metrics.items()}


def _report_to(args: Any) -> list[str]:
    """``TrainingArguments.report_to`` as a list (it may be one string, a list, or None)."""
    return [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])


def _wandb_run(args: Any) -> Any:
    """The W&B run the Trainer's ``WandbCallback`` logs into, or None when the Trainer does not report to W&B."""
    if "wandb" not in _report_to(args):
        return None
    import wandb  # the Trainer's WandbCallback has imported it already

    return wandb.run


def _eval_prefix(logs: dict[str, Any] | None) -> str | None:
    """The metric prefix (``eval``, ``eval_<dataset>``) if ``logs`` are evaluation metrics, else None."""
    if not logs:
        return None
    for key in logs:
        if key.endswith("_runtime") and not key.startswith("train"):
            return key[: -len("_runtime")]
    return None
