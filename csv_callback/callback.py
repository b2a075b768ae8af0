"""Lightning glue: predicted benchmark scores after every validation, logged like any other metric.

:class:`SalienceCallback` computes the probe's per-token losses with :func:`~csv_callback.token_losses`
when a validation ends, turns them into predicted scores with each :class:`~csv_callback.SalienceVector`,
and logs them through ``pl_module.log`` from ``on_validation_epoch_end``. Lightning runs that hook before it
hands the epoch's metrics to the loggers and before ``on_validation_end``, where ``EarlyStopping`` and
``ModelCheckpoint`` read ``trainer.callback_metrics``; so every logger receives the predictions and both stock
callbacks can monitor ``csv/<task>/pred`` unmodified. Nothing runs on the training hot path.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message, rank_zero_warn
from torch import nn

from ._faults import (
    check_scores_probe,
    guarded,
    loss_summary,
    losses_failed_message,
    nonfinite_message,
    open_loss_store,
    prediction,
    usable,
)
from .losses import token_losses
from .probe import ProbeMismatchError, ProbeSet
from .salience import SalienceVector
from .store import LossStore

PathLike = str | os.PathLike


class SalienceCallback(Callback):
    r"""Log predicted downstream scores of the model being trained after every validation.

    Args:
        vectors: one or more :class:`SalienceVector` objects or paths to saved vectors. Task names must be
            unique: they name the metrics. ``None`` or ``[]`` with a ``save_dir`` only collects the losses
            (and logs the probe's mean loss), before any vector exists.
        probe: the :class:`ProbeSet` (or path to one) the vectors were fitted on; a sequence of probes when
            the vectors use several. Each vector is matched to the probe with its fingerprint, and each probe
            is run once per validation, shared by all of its vectors.
        batch_size: probe sequences per forward pass.
        save_dir: if given, the per-token losses of every evaluated checkpoint are stored there with
            :class:`~csv_callback.store.LossStore` (one file per step, named ``step-<global_step:09d>``;
            read them back with :func:`~csv_callback.store.load_losses`). With several probes each gets the
            sub-directory ``<save_dir>/<probe fingerprint>``.
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

    Logged after every validation of ``trainer.fit`` (not the sanity check) and on ``trainer.validate``:
    ``csv/<task>/pred``, ``csv/<task>/weighted_loss``, ``csv/<task>/extrapolating`` (1.0 when the weighted
    loss is outside the range seen in fitting), ``csv/probe_mean_loss`` (``csv/<fingerprint>/probe_mean_loss``
    with several probes), ``csv/nonfinite_losses`` (count of NaN/inf token losses) and ``csv/eval_seconds``
    (the time this callback added to the validation).

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
        vectors: SalienceVector | PathLike | Sequence[SalienceVector | PathLike] | None,
        probe: ProbeSet | PathLike | Sequence[ProbeSet | PathLike],
        batch_size: int = 8,
        save_dir: PathLike | None = None,
        model_attr: str | None = None,
        tokenizer_attr: str | None = "tokenizer",
        tokens_seen_attr: str | None = "tokens_seen",
        prefix: str = "csv",
        wandb_extras: bool = True,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"SalienceCallback(batch_size=...) must be a positive int, got {batch_size!r}.")
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"SalienceCallback(prefix=...) must be a non-empty name without a trailing '/', got {prefix!r}.")
        for name, attr in (("model_attr", model_attr), ("tokenizer_attr", tokenizer_attr), ("tokens_seen_attr", tokens_seen_attr)):
            if attr is not None and (not isinstance(attr, str) or not attr):
                raise ValueError(f"SalienceCallback({name}=...) must be None or an attribute name, got {attr!r}.")
        vector_list = [] if vectors is None else vectors if isinstance(vectors, (list, tuple)) else [vectors]
        if not vector_list and save_dir is None:
            raise ValueError(
                "SalienceCallback(vectors=...) is empty; pass at least one vector, or a save_dir to only collect "
                "the per-token losses (e.g. to fit the first vectors later)."
            )
        self.vectors = [_load(v, SalienceVector, "vectors") for v in vector_list]
        self.probes = _unique_probes([_load(p, ProbeSet, "probe") for p in _as_list(probe, "probe")])
        self._groups = _match(self.vectors, self.probes)
        self.batch_size = batch_size
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.model_attr = model_attr
        self.tokenizer_attr = tokenizer_attr
        self.tokens_seen_attr = tokens_seen_attr
        self.prefix = prefix
        self.wandb_extras = wandb_extras
        # One row per (step, task): what the W&B table shows and what a resumed run continues.
        self.history: list[dict[str, Any]] = []
        self._stores: dict[str, LossStore] = {}
        self._shards: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._model_checked = False
        self._view_logged = False

    # ------------------------------------------------------------------ Lightning state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(tasks=[v.task for v in self.vectors], prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "probes": [p.fingerprint for p in self.probes]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if sorted(state_dict.get("probes", [])) != sorted(p.fingerprint for p in self.probes):
            rank_zero_warn(
                f"SalienceCallback: the checkpoint's history was computed on probes {state_dict.get('probes')}, "
                f"not on this callback's {[p.fingerprint for p in self.probes]}; starting a fresh history.",
                category=RuntimeWarning,
            )
            return
        self.history = [dict(r) for r in state_dict["history"]]

    # ------------------------------------------------------------------ checks before training
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._model(pl_module)
        tokenizer = getattr(pl_module, self.tokenizer_attr, None) if self.tokenizer_attr else None
        if tokenizer is not None:
            for probe in self.probes:
                probe.check_tokenizer(tokenizer)
        if self.save_dir is not None and trainer.is_global_zero and not self._stores:
            self._stores = {p.fingerprint: open_loss_store(self._store_root(p), p, "SalienceCallback", self.save_dir)
                            for p in self.probes}
        if self.wandb_extras and trainer.is_global_zero:
            _guarded("define the W&B metrics", lambda: _wandb().define_metrics(trainer, self._metric_summaries()))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_model(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_model(pl_module)

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
        """Fail before the first step if the model cannot score every probe (see :func:`~csv_callback._faults.check_scores_probe`)."""
        if self._model_checked:
            return
        model = self._model(pl_module)
        if self.model_attr is None:
            where = "the LightningModule"
            hint = ("if its forward does not return logits, set model_attr to the attribute holding the causal LM "
                    "(e.g. 'model')")
        else:
            where = f"pl_module.{self.model_attr}"
            hint = f"if {where} is not the causal LM, set model_attr to the attribute that holds it"
        for probe in self.probes:
            check_scores_probe(model, probe, "SalienceCallback", where, hint)
        self._model_checked = True

    # ------------------------------------------------------------------ the evaluation
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        step = int(trainer.global_step)
        model = self._model(pl_module)
        metrics: dict[str, float] = {}
        n_bad = 0.0  # becomes NaN, "unknown", if some probe's losses could not be computed
        for probe in self.probes:
            losses = self._probe_losses(trainer, model, probe, step)
            mean_loss, bad = loss_summary(losses)
            n_bad += bad
            metrics[self._mean_loss_name(probe)] = mean_loss
            for vector in self._groups[probe.fingerprint]:
                metrics.update(self._predict(vector, usable(losses, bad), step))
            if losses is None:  # _probe_losses warned; there is nothing to save
                continue
            if bad:
                _warn(nonfinite_message("SalienceCallback", int(bad), probe, step, f"{self.prefix}/nonfinite_losses"))
            elif probe.fingerprint in self._stores:
                self._save(trainer, pl_module, probe, losses, step)
        metrics[f"{self.prefix}/nonfinite_losses"] = n_bad
        if self.wandb_extras and trainer.is_global_zero:
            self._log_wandb(trainer, pl_module)
        metrics[f"{self.prefix}/eval_seconds"] = time.perf_counter() - start
        for name, value in metrics.items():
            # Values are identical on every rank (eval_seconds aside); sync_dist averages them, a no-op that
            # also keeps every rank's callback_metrics, and so EarlyStopping, in agreement.
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def _predict(self, vector: SalienceVector, losses: torch.Tensor | None, step: int) -> dict[str, float]:
        pred, wl, extrapolating = prediction(vector, losses)
        row = {"step": step, "task": vector.task, "pred": pred, "weighted_loss": wl, "extrapolating": extrapolating}
        # A re-evaluated step (trainer.validate() after fit, a resumed run) replaces its row.
        self.history = [r for r in self.history if (r["step"], r["task"]) != (step, vector.task)] + [row]
        base = f"{self.prefix}/{vector.task}"
        return {f"{base}/pred": pred, f"{base}/weighted_loss": wl, f"{base}/extrapolating": float(extrapolating)}

    def _probe_losses(self, trainer: pl.Trainer, model: nn.Module, probe: ProbeSet, step: int) -> torch.Tensor | None:
        """float32 ``[probe.n_tokens]`` on the CPU, identical on every rank.

        If some rank cannot compute its losses, every rank returns None during ``fit`` (the failing rank
        warns) and raises outside it (``trainer.validate``), where there is no run to protect.
        """
        world, rank = trainer.world_size, trainer.global_rank
        if world > 1 and probe.fingerprint not in self._shards:
            self._shards[probe.fingerprint] = _shard(probe, world)
        sequences = self._shards[probe.fingerprint][0][rank] if world > 1 else None
        error: Exception | None = None
        try:
            local = token_losses(model, probe, batch_size=self.batch_size, sequences=sequences)
        except Exception as e:  # decided on below, once every rank knows whether any rank failed
            local, error = None, e
        if world == 1:
            losses, failed = local, [0] if error is not None else []
        else:
            losses, failed = self._gather(trainer, probe, local)
        if not failed:
            return losses
        if trainer.state.fn != TrainerFn.FITTING:
            if error is not None:
                raise error
            raise RuntimeError(f"SalienceCallback: rank(s) {failed} could not compute the token losses of probe "
                               f"{probe.fingerprint}; their error is in their output.")
        if error is not None:
            message = losses_failed_message("SalienceCallback", probe, step, error)
            # Not rank_zero_warn: the failing rank is the one that knows the error.
            warnings.warn(message if world == 1 else rank_prefixed_message(message, rank), RuntimeWarning, stacklevel=2)
        else:
            rank_zero_warn(f"SalienceCallback: rank(s) {failed} could not compute the token losses of probe "
                           f"{probe.fingerprint} at step {step} (see their warning); this evaluation's predictions "
                           "are skipped on every rank and training continues.", category=RuntimeWarning)
        return None

    def _gather(
        self, trainer: pl.Trainer, probe: ProbeSet, local: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[int]]:
        """The full loss vector ``[probe.n_tokens]`` from every rank's shard, and the ranks whose shard failed."""
        positions = self._shards[probe.fingerprint][1]
        world, rank = trainer.world_size, trainer.global_rank
        width = max(len(p) for p in positions)
        # A rank whose losses failed still joins the all_gather (the others would wait for it forever) and
        # flags its failure in one extra slot, so that every rank skips this evaluation together.
        padded = torch.full((width + 1,), math.nan, dtype=torch.float32)
        n_local = len(positions[rank])
        if local is None:
            padded[width] = 1.0
        else:
            padded[:n_local] = local[:n_local]  # drops the losses of the padding sequence, if any
            padded[width] = 0.0
        gathered = trainer.strategy.all_gather(padded.to(trainer.strategy.root_device)).reshape(world, width + 1).cpu()
        out = torch.empty(probe.n_tokens, dtype=torch.float32)
        for r, pos in enumerate(positions):
            out[pos] = gathered[r, : len(pos)]
        return out, torch.nonzero(gathered[:, width]).flatten().tolist()

    # ------------------------------------------------------------------ side outputs (never fatal)
    def _store_root(self, probe: ProbeSet) -> Path:
        return self.save_dir if len(self.probes) == 1 else self.save_dir / probe.fingerprint

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: ProbeSet, losses: torch.Tensor, step: int) -> None:
        seen = getattr(pl_module, self.tokens_seen_attr, None) if self.tokens_seen_attr else None
        if isinstance(seen, torch.Tensor):
            seen = seen.item() if seen.numel() == 1 else None
        seen = float(seen) if isinstance(seen, (int, float)) and not isinstance(seen, bool) else None
        extra = {"epoch": int(trainer.current_epoch), "stage": getattr(trainer.state.stage, "value", None)}
        store = self._stores[probe.fingerprint]
        _guarded(
            f"save the probe losses of step {step} to {store.root}",
            lambda: store.write(f"step-{step:09d}", losses, step=step, tokens_seen=seen, extra=extra),
        )

    def _log_wandb(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        view = _wandb()
        if not self.vectors or not view.wandb_runs(trainer):  # nothing predicted: no table, no view
            return
        _guarded("log the predictions table to W&B", lambda: view.log_table(trainer, self.history, self.prefix))
        if not self._view_logged:
            tokenizer = getattr(pl_module, self.tokenizer_attr, None) if self.tokenizer_attr else None
            for probe in self.probes:
                for vector in self._groups[probe.fingerprint]:
                    _guarded(
                        f"log the salience view of {vector.task!r} to W&B",
                        lambda: view.log_salience_view(trainer, vector, probe, tokenizer, self.prefix),
                    )
            self._view_logged = True

    def _mean_loss_name(self, probe: ProbeSet) -> str:
        return f"{self.prefix}/probe_mean_loss" if len(self.probes) == 1 else f"{self.prefix}/{probe.fingerprint}/probe_mean_loss"

    def _metric_summaries(self) -> dict[str, str]:
        out = {f"{self.prefix}/eval_seconds": "mean", f"{self.prefix}/nonfinite_losses": "max"}
        for p in self.probes:
            out[self._mean_loss_name(p)] = "min"
        for v in self.vectors:
            base = f"{self.prefix}/{v.task}"
            out |= {f"{base}/pred": "max", f"{base}/weighted_loss": "min", f"{base}/extrapolating": "max"}
        return out


def _warn(message: str) -> None:
    rank_zero_warn(message, category=RuntimeWarning)


_guarded = partial(guarded, owner="SalienceCallback", warn=_warn)


# ---------------------------------------------------------------------- helpers
def _wandb():
    # W&B is only imported when a run uses it.
    from . import wandb_view

    return wandb_view


def _as_list(x: Any, name: str) -> list:
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    if not items:
        raise ValueError(f"SalienceCallback({name}=...) is empty; pass at least one.")
    return items


def _load(x: Any, cls: type, name: str) -> Any:
    if isinstance(x, cls):
        return x
    if isinstance(x, (str, os.PathLike)):
        return cls.load(x)
    raise ValueError(f"SalienceCallback({name}=...) takes {cls.__name__} objects or paths, got {type(x).__name__}.")


def _unique_probes(probes: list[ProbeSet]) -> list[ProbeSet]:
    seen: dict[str, ProbeSet] = {}
    for p in probes:
        seen.setdefault(p.fingerprint, p)
    return list(seen.values())


def _match(vectors: list[SalienceVector], probes: list[ProbeSet]) -> dict[str, list[SalienceVector]]:
    """Probe fingerprint -> the vectors fitted on that probe; a vector without its probe is an error."""
    tasks = [v.task for v in vectors]
    dupes = sorted({t for t in tasks if tasks.count(t) > 1})
    if dupes:
        raise ValueError(f"SalienceCallback: several vectors share the task name(s) {dupes}; the metric names would collide.")
    groups: dict[str, list[SalienceVector]] = {p.fingerprint: [] for p in probes}
    for v in vectors:
        if v.probe_fingerprint:
            found = [p for p in probes if p.fingerprint == v.probe_fingerprint]
        else:  # a hand-built vector without provenance: accept the one probe of its length
            found = [p for p in probes if p.n_tokens == v.n_tokens][:1] if len(probes) == 1 else []
        if not found:
            raise ProbeMismatchError(
                f"SalienceCallback: vector {v.task!r} was fitted on probe {v.probe_fingerprint or '?'} "
                f"({v.n_tokens} tokens), but the probes given are "
                f"{[f'{p.fingerprint} ({p.n_tokens} tokens)' for p in probes]}; pass the probe file shipped with the vector."
            )
        probe = found[0]
        v.check_probe(probe)
        if v.tokenizer_hash and v.tokenizer_hash != probe.tokenizer_hash:
            raise ProbeMismatchError(
                f"SalienceVector {v.task!r} was fitted with tokenizer {v.tokenizer_hash}, but probe {probe.fingerprint} "
                f"was built with tokenizer {probe.tokenizer_hash}; use the vector's own probe."
            )
        groups[probe.fingerprint].append(v)
    return groups


def _shard(probe: ProbeSet, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per rank: the probe sequences it scores and where their losses go in the full loss vector.

    Sequences are dealt longest-first, so ranks get similar work. Every rank gets the same number of
    sequences (a short shard repeats its first one), so each runs the same number of forward passes, as
    sharded-parameter strategies (FSDP, DeepSpeed) require.
    """
    order = torch.argsort(probe.lengths, descending=True, stable=True)
    real = [order[r::world] for r in range(world)]
    per_rank = max(len(s) for s in real)
    so = probe.score_offsets
    shards, positions = [], []
    for s in real:
        if len(s) == 0:  # fewer sequences than ranks: score sequence 0 and throw it away
            pad = order[:1].repeat(per_rank)
        else:
            pad = s[:1].repeat(per_rank - len(s))
        shards.append(torch.cat([s, pad]))
        positions.append(torch.cat([torch.arange(int(so[i]), int(so[i + 1])) for i in s.tolist()] or [torch.empty(0, dtype=torch.int64)]))
    return shards, positions
