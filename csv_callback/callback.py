"""Lightning glue: predicted benchmark scores after every validation, logged like any other metric.

:class:`SalienceCallback` is a thin adapter around :class:`~csv_callback.evaluator.SalienceEvaluator`: when a
validation ends it has the evaluator score the probe and logs the metrics through ``pl_module.log`` from
``on_validation_epoch_end``. Lightning runs that hook before it hands the epoch's metrics to the loggers and
before ``on_validation_end``, where ``EarlyStopping`` and ``ModelCheckpoint`` read
``trainer.callback_metrics``; so every logger receives the predictions and both stock callbacks can monitor
``csv/<task>/pred`` unmodified. Nothing runs on the training hot path.
"""

from __future__ import annotations

import os
from operator import attrgetter
from typing import Any

import torch
from torch import nn

from ._extras import extra_imports
from .evaluator import Evaluation, EvaluatorViews, SalienceEvaluator, Sharding, parameter_count
from .probe import ProbeSet
from .salience import SalienceVector
from .wandb_view import WandbExtras

with extra_imports("lightning", __name__):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

PathLike = str | os.PathLike
_OWNER = "SalienceCallback"


class SalienceCallback(EvaluatorViews, Callback):
    r"""Log predicted downstream scores of the model being trained after every validation.

    Args:
        vectors: one or more :class:`SalienceVector` objects or paths to saved vectors. Task names must be
            unique: they name the metrics. ``None`` or ``[]`` with a ``save_dir`` only collects the losses
            (and logs the probe's mean loss), before any vector exists.
        probe: the :class:`ProbeSet` (or path to one) the vectors were fitted on; a sequence of probes when
            the vectors use several. Each vector is matched to the probe with its fingerprint, and each probe
            is run once per validation, shared by all of its vectors. None when every vector is a domain vector.
        batch_size: probe sequences per forward pass.
        save_dir: if given, the per-token losses of every evaluated checkpoint are stored there with
            :class:`~csv_callback.store.LossStore` (one file per step of ``fit``, named
            ``step-<global_step:09d>``; a ``trainer.validate`` of other weights is stored as
            ``eval-<checkpoint>-step-<step>``, never over a step; read them back with
            :func:`~csv_callback.store.load_losses`). With several probes each gets the sub-directory
            ``<save_dir>/<probe fingerprint>``. The directory belongs to one run: a fresh run into a directory
            that holds another run's losses fails before training; a run resumed from its checkpoint goes on.
            Each evaluation records the evaluated model's parameter count (the ``model_attr`` module's, embeddings
            included: :func:`~csv_callback.evaluator.parameter_count`) and ``tokens_seen``, the N and D of a
            scaling law (``csv-callback scaling``).
        model_attr: where the causal LM is: ``None`` uses the LightningModule itself (its ``forward`` must
            map token ids ``[B, T]`` to logits ``[B, T, V]``); a (dotted) attribute name such as ``"model"``
            uses ``pl_module.model``, e.g. a Hugging Face ``AutoModelForCausalLM``.
        tokenizer_attr: by convention a LightningModule that holds its tokenizer in ``pl_module.tokenizer``
            has it checked against each probe at ``setup``; ``None`` skips the check.
        tokens_seen_attr: if the LightningModule has a numeric attribute of this name (a counter it keeps),
            its value is stored with the losses in ``save_dir``.
        prefix: the metrics' name prefix.
        wandb_extras: with a ``WandbLogger``: define the metrics against ``trainer/global_step`` with a
            ``max`` (scores) / ``min`` (losses) summary, log a table of all predictions and, once per run, an
            HTML view of the most salient probe tokens.
        interval_level: the coverage, in (0, 1), of the prediction interval logged as ``csv/<task>/pred_lo`` and
            ``csv/<task>/pred_hi`` (:meth:`SalienceVector.predict_interval`), and of the forecast's.
        forecast_step: the global step whose score ``csv/<task>/forecast`` forecasts; None: the run's planned end,
            ``trainer.estimated_stepping_batches`` (``max_steps``, or ``max_epochs`` times the optimizer steps per
            epoch, whichever ends training first).
        domain_metrics: for domain vectors, domain name -> the metric the LightningModule logs as that domain's
            validation loss (e.g. ``{"c4": "val/c4/loss"}``, logged in ``validation_step``); their predictions
            are made from ``trainer.callback_metrics`` at the end of each validation, with no forward pass.

    Logged after every validation of ``trainer.fit`` (not the sanity check) and on ``trainer.validate``:
    ``csv/<task>/pred``, ``csv/<task>/pred_lo`` and ``csv/<task>/pred_hi`` (its interval at ``interval_level``,
    NaN for a vector fitted before intervals existed), ``csv/<task>/weighted_loss``, ``csv/<task>/extrapolating``
    (1.0 when the weighted loss is outside the range seen in fitting), ``csv/probe_mean_loss``
    (``csv/<fingerprint>/probe_mean_loss`` with several probes), ``csv/nonfinite_losses`` (count of NaN/inf token
    losses) and ``csv/eval_seconds`` (the time this callback added to the validation).

    In ``fit`` also ``csv/<task>/forecast``, ``csv/<task>/forecast_lo`` and ``csv/<task>/forecast_hi``: the score
    the run will reach at its end (``forecast_step``) and its interval, from the third validation on the
    forecast of :func:`~csv_callback.forecast.forecast_score`; before that the prediction now, with the
    link's whole range as its interval. They are logged from the first validation, finite, so a stock
    ``EarlyStopping`` can monitor them at once (see :class:`~csv_callback.evaluator.SalienceEvaluator` for the
    rules). To stop a run whose optimistic forecast falls below ``t``, and only then::

        EarlyStopping(monitor="csv/<task>/forecast_hi", mode="max", divergence_threshold=t, patience=10**9)

    (a large ``patience``: the forecast's upper end narrows as validations accumulate, which ``EarlyStopping``
    would otherwise count as validations without improvement).

    Resume: the prediction history, the run's identity and which steps were evaluated are saved in every
    checkpoint. If the checkpoint a run resumes from was written before that step's validation (e.g.
    ``ModelCheckpoint(every_n_train_steps=...)``) and the validation never finished, that step is evaluated
    when training restarts, so the series has no gap; if checkpoints and validations are not aligned this
    adds a point at the checkpoint's step. Not with domain vectors: their losses come from a validation, so that
    step stays a gap. A resumed run with more or fewer vectors keeps the history of the
    tasks that continue (and warns).

    Under DDP the probe's sequences are sharded across ranks and the losses gathered, so every rank logs the
    same values and ``EarlyStopping`` decisions agree.

    Faults: what can be checked before training fails at ``setup`` / ``on_fit_start`` with a message saying
    how to fix it (a wrong tokenizer, a probe longer than the model's context window or with token ids
    beyond its vocabulary, a model that returns no logits, a ``save_dir`` that is not a writable directory or
    holds another probe's losses). Inside ``fit`` nothing the callback does stops training: NaN/inf losses,
    losses that cannot be computed and failed side outputs (``save_dir``, W&B) each warn; the predictions
    of such a validation are logged as NaN with ``extrapolating`` 1.0, and its losses are not saved.

    Example::

        trainer = Trainer(callbacks=[
            SalienceCallback(["arc_easy.safetensors"], "probe.safetensors", save_dir="losses/"),
            EarlyStopping(monitor="csv/arc_easy/pred", mode="max"),
        ])
    """

    def __init__(
        self,
        vectors: list[SalienceVector | PathLike] | SalienceVector | PathLike | None,
        probe: list[ProbeSet | PathLike] | ProbeSet | PathLike | None = None,
        batch_size: int = 8,
        save_dir: PathLike | None = None,
        model_attr: str | None = None,
        tokenizer_attr: str | None = "tokenizer",
        tokens_seen_attr: str | None = "tokens_seen",
        prefix: str = "csv",
        wandb_extras: bool = True,
        interval_level: float = 0.8,
        forecast_step: int | None = None,
        domain_metrics: dict[str, str] | None = None,
    ) -> None:
        for name, attr in (
            ("model_attr", model_attr),
            ("tokenizer_attr", tokenizer_attr),
            ("tokens_seen_attr", tokens_seen_attr),
        ):
            if attr is not None and (not isinstance(attr, str) or not attr):
                raise ValueError(f"SalienceCallback({name}=...) must be None or an attribute name, got {attr!r}.")
        self.evaluator = SalienceEvaluator(vectors, probe, batch_size, save_dir, prefix, owner=_OWNER,
                                           interval_level=interval_level, forecast_step=forecast_step,
                                           domain_metrics=domain_metrics)
        self.model_attr = model_attr
        self.tokenizer_attr = tokenizer_attr
        self.tokens_seen_attr = tokens_seen_attr
        self.wandb_extras = wandb_extras
        self._fn: TrainerFn | None = None
        self._loaded_step: int | None = None  # global_step of the checkpoint this trainer call loaded
        self._model_checked = False
        self._end_step: float | None = None  # the planned end of the run being fitted
        self._wandb = WandbExtras(self.evaluator)

    # ------------------------------------------------------------------ Lightning state
    @property
    def state_key(self) -> str:
        # Not keyed by the task list: a run resumed with another set of vectors keeps its history.
        return self._generate_state_key(prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return self.evaluator.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A fitting run continues the checkpoint's run. Outside fit (trainer.validate(ckpt_path=...)) only an
        # evaluator that has not started adopts it (a fresh process evaluating that run's checkpoints): after
        # fit, the best checkpoint's older state must not rewrite the history of the run.
        if self._fn == TrainerFn.FITTING or not self.evaluator.started:
            self.evaluator.load_state_dict(state_dict)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._loaded_step = int(checkpoint.get("global_step", trainer.global_step))
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        # Checkpoints of earlier versions keyed the state by the task list as well as the prefix.
        legacy = [k for k in states if isinstance(k, str) and k.startswith(f"{type(self).__name__}{{")
                  and f"'prefix': {self.prefix!r}" in k]
        if legacy:
            self.load_state_dict(states[legacy[0]])

    # ------------------------------------------------------------------ checks before training
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fn = trainer.state.fn
        self._loaded_step = None
        self._model(pl_module)
        tokenizer = getattr(pl_module, self.tokenizer_attr, None) if self.tokenizer_attr else None
        if tokenizer is not None:
            self.evaluator.check_tokenizer(
                tokenizer, f"pass tokenizer_attr=None if pl_module.{self.tokenizer_attr} is not the probe's tokenizer")
        if self.wandb_extras and trainer.is_global_zero:
            self._wandb.define_metrics(_wandb_runs(trainer), "trainer/global_step")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_model(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The run's state (its id, for the store) is restored by now, whatever the strategy.
        if trainer.is_global_zero:
            self.evaluator.open_store()
        self._end_step = float(trainer.estimated_stepping_batches)
        if self.vectors and self.evaluator.forecast_step is None and not 0 < self._end_step < float("inf"):
            rank_zero_warn("SalienceCallback: this run has no planned end (max_steps and max_epochs are -1, or an "
                           "iterable dataset without max_steps), so no forecast is logged; pass forecast_step=... "
                           "to forecast the score at a step of your choice.", category=RuntimeWarning)
        step = int(trainer.global_step)
        # Domain vectors read the validation's logged losses, which a validation cut short never logged: with them
        # the step stays a gap rather than a NaN point (or a false "never logged" error at their first one).
        if trainer.ckpt_path is not None and not self.evaluator.domain_vectors and self.evaluator.missed(step):
            rank_zero_warn(f"SalienceCallback: the checkpoint resumed from ({trainer.ckpt_path}) holds step {step}, "
                           "which this run never evaluated (a validation cut short); evaluating it now.",
                           category=RuntimeWarning)
            evaluation = self._evaluate(trainer, pl_module, training=True)
            for logger in trainer.loggers:
                self.evaluator.guard(f"log the metrics of step {step} to {type(logger).__name__}",
                                     logger.log_metrics, evaluation.metrics, step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_model(pl_module)
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.evaluator.open_store()

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.model_attr is None:
            return pl_module
        try:
            model = attrgetter(self.model_attr)(pl_module)
        except AttributeError:
            model = None
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"SalienceCallback(model_attr={self.model_attr!r}): {type(pl_module).__name__}.{self.model_attr} is "
                f"{type(model).__name__}, not a torch module; pass the attribute that holds the causal LM, or "
                "model_attr=None if the LightningModule's forward maps token ids to logits."
            )
        return model

    def _check_model(self, pl_module: pl.LightningModule) -> None:
        """Fail before the first step if the model cannot score every probe."""
        if self._model_checked:
            return
        if self.model_attr is None:
            where = "the LightningModule"
            hint = ("if its forward does not return logits, set model_attr to the attribute holding the causal LM "
                    "(e.g. 'model')")
        else:
            where = f"pl_module.{self.model_attr}"
            hint = f"if {where} is not the causal LM, set model_attr to the attribute that holds it"
        self.evaluator.check_model(self._model(pl_module), where, hint)
        self._model_checked = True

    # ------------------------------------------------------------------ the evaluation
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        evaluation = self._evaluate(trainer, pl_module, training=trainer.state.fn == TrainerFn.FITTING)
        for name, value in evaluation.metrics.items():
            # Values are identical on every rank (eval_seconds aside); sync_dist averages them, a no-op that
            # also keeps every rank's callback_metrics, and so EarlyStopping, in agreement.
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, training: bool) -> Evaluation:
        # Outside fit the weights are those of the checkpoint this call loaded, if any: name them by it.
        checkpoint = None if training or self._loaded_step is None else trainer.ckpt_path
        step = int(trainer.global_step) if checkpoint is None else self._loaded_step
        sharding = None
        if trainer.world_size > 1:
            sharding = Sharding(trainer.global_rank, trainer.world_size, trainer.strategy.all_gather,
                                trainer.strategy.root_device)
        model = self._model(pl_module)
        evaluation = self.evaluator.evaluate(
            model, step, training=training, checkpoint=checkpoint,
            tokens_seen=self._tokens_seen(pl_module), params=parameter_count(model),
            extra={"epoch": int(trainer.current_epoch), "stage": getattr(trainer.state.stage, "value", None)},
            sharding=sharding, end_step=self._end_step, logged=trainer.callback_metrics)
        if self.wandb_extras and trainer.is_global_zero:
            tokenizer = getattr(pl_module, self.tokenizer_attr, None) if self.tokenizer_attr else None
            self._wandb.after_evaluation(_wandb_runs(trainer), tokenizer)
        return evaluation

    def _tokens_seen(self, pl_module: pl.LightningModule) -> float | None:
        seen = getattr(pl_module, self.tokens_seen_attr, None) if self.tokens_seen_attr else None
        if isinstance(seen, torch.Tensor):
            seen = seen.item() if seen.numel() == 1 else None
        return float(seen) if isinstance(seen, (int, float)) and not isinstance(seen, bool) else None

    # ------------------------------------------------------------------ side outputs (never fatal)


def _wandb_runs(trainer: pl.Trainer) -> list[Any]:
    """The ``wandb`` runs of the trainer's ``WandbLogger``\\ s (rank 0 only; other ranks hold dummies)."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]
