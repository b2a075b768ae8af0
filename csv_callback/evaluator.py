"""One evaluation of one model state: probe -> per-token losses -> predicted scores -> metrics.

:class:`SalienceEvaluator` is the product's logic with no training framework in it: it loads and matches
probes and vectors, checks a model before training, computes the probe's exact per-token losses (sharded
across ranks when given a :class:`Sharding`), turns them into predictions, names the metrics, saves the
losses to a :class:`~csv_callback.store.LossStore`, keeps the run's prediction history (state to save and
restore) and applies the fault policy: raise before training or outside it, warn and go on inside it.
The Lightning and Hugging Face callbacks are thin adapters around it; any other training loop can call
:meth:`SalienceEvaluator.evaluate` at its own evaluation points and log the returned metrics itself::

    evaluator = SalienceEvaluator(["arc_easy.safetensors"], "probe.safetensors", save_dir="probe_losses")
    evaluator.check_model(model)          # before the first step: context window, vocabulary, logits
    ...
    metrics = evaluator.evaluate(model, step, training=True).metrics
    wandb.log(metrics, step=step)

How evaluations are named in the store and the history: inside training, by the step (``step-<step:09d>``;
a resumed run re-evaluating a step replaces it, same weights, same losses). Outside training (a validation
of other weights, e.g. the best checkpoint after ``fit``), by what was evaluated,
``eval-<checkpoint>-step-<step:09d>`` or ``eval-step-<step:09d>``, with ``-2``, ``-3``... added so that
an evaluation never replaces another one nor a training step's.
"""

from __future__ import annotations

import functools
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .forecast import running_forecast
from .losses import token_losses
from .probe import ProbeMismatchError, ProbeSet
from .salience import SalienceVector, check_level
from .store import LossStore, RunMismatchError

PathLike = str | os.PathLike
STATE_VERSION = 2


@dataclass(frozen=True)
class Sharding:
    """How the probe is split across the ranks of a data-parallel job.

    ``all_gather`` maps a 1-D float tensor ``[k]`` (same ``k`` on every rank) to ``[world_size, k]`` (or
    anything that reshapes to it), as Lightning's ``strategy.all_gather`` and
    ``torch.distributed.all_gather_into_tensor`` do. ``device`` is where the tensor must be for it.
    """

    rank: int
    world_size: int
    all_gather: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device | str = "cpu"


def torch_distributed_sharding(device: torch.device | str = "cpu") -> Sharding | None:
    """A :class:`Sharding` over the default ``torch.distributed`` process group, or None outside one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    world = dist.get_world_size()

    def gather(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, t.contiguous())
        return out

    return Sharding(dist.get_rank(), world, gather, device)


@dataclass(frozen=True)
class Evaluation:
    """What one call of :meth:`SalienceEvaluator.evaluate` produced.

    Attributes:
        name: the evaluation's name in the store and the history (see the module docstring).
        step: the training step of the evaluated weights.
        metrics: metric name -> value, e.g. ``csv/<task>/pred``.
    """

    name: str
    step: int
    metrics: dict[str, float]


class SalienceEvaluator:
    r"""Predicted downstream scores of one model state, with everything a training run needs around them.

    Args:
        vectors: :class:`SalienceVector` objects or paths to saved vectors; tasks name the metrics and must be
            unique. ``None`` or ``[]`` with a ``save_dir`` only collects losses (logging the probe's mean loss).
        probe: the :class:`ProbeSet` (or path) the vectors were fitted on, or a sequence of probes when the
            vectors use several; each vector is matched to its probe by fingerprint, and each probe is scored
            once per evaluation, shared by its vectors. None when every vector is a domain vector: then no
            forward pass is made at all.
        batch_size: probe sequences per forward pass.
        save_dir: where the per-token losses of every evaluation are stored
            (:class:`~csv_callback.store.LossStore`; with several probes one sub-directory per probe
            fingerprint). The store records this evaluator's :attr:`run_id`: another run's store is refused.
        prefix: the metrics' name prefix.
        owner: the name used in messages (the adapter's class name).
        interval_level: the coverage, in (0, 1), of the prediction interval logged as ``pred_lo``/``pred_hi``
            (:meth:`SalienceVector.predict_interval`) and of the forecast's interval.
        forecast_step: the training step whose score is forecast (see below); None forecasts the run's planned
            end, which the adapter passes to :meth:`evaluate` as ``end_step`` (no forecast without either).
        domain_metrics: for domain vectors (:attr:`SalienceVector.domains`), domain name -> the name of the metric
            the training loop logs as that domain's validation loss (e.g. ``{"c4": "val/c4/loss"}``); every domain
            of every domain vector must be mapped, and nothing else. :meth:`evaluate` reads them from its
            ``logged`` metrics: a domain vector costs no forward pass.

    Metrics of :meth:`evaluate`: ``<prefix>/<task>/pred``, ``<prefix>/<task>/pred_lo`` and
    ``<prefix>/<task>/pred_hi`` (the prediction interval at ``interval_level``; NaN for a vector fitted before
    intervals existed), ``<prefix>/<task>/weighted_loss``,
    ``<prefix>/<task>/extrapolating`` (1.0 outside the loss range the vector was fitted on),
    ``<prefix>/probe_mean_loss`` (``<prefix>/<fingerprint>/probe_mean_loss`` with several probes),
    ``<prefix>/nonfinite_losses`` and ``<prefix>/eval_seconds``.

    In training, with an end step known (``forecast_step``, or the ``end_step`` the adapter passes), also
    ``<prefix>/<task>/forecast``, ``<prefix>/<task>/forecast_lo`` and ``<prefix>/<task>/forecast_hi``: the score the
    run will reach at the end step and its interval at ``interval_level``
    (:func:`~csv_callback.forecast.forecast_score` on the weighted losses of the run's validations at steps > 0).
    They are logged from the first validation on, never NaN for a finite loss, so that a stock early-stopping
    callback can monitor them from the start:

    - with fewer than ``MIN_POINTS`` (3) such validations, the forecast is the prediction now and its interval is
      everything the vector's link can give (``link.lo`` .. ``link.hi``): nothing is known yet about the end;
    - from the third on, the forecast of :func:`~csv_callback.forecast.forecast_score`, which uses the trajectory
      prior the vector carries (its fitting runs' schedule is assumed: see :mod:`csv_callback.forecast`);
    - at or after the end step, the prediction now and its interval.

    An interval the vector cannot give (no stored residuals) spans the link's range instead of being NaN. An
    evaluation whose losses could not be computed, or are NaN/inf, logs a NaN forecast like its prediction.
    Evaluations outside training forecast nothing.

    Domain vectors log the same metrics, from the ``logged`` metrics :meth:`evaluate` is given. A mapped metric
    missing from the first evaluation is an error naming the metrics that were logged (the mapping is wrong, or
    the loop logs them later than the adapter reads them); missing later, or NaN/inf, it warns and the
    prediction is NaN, and training goes on.
    """

    def __init__(
        self,
        vectors: SalienceVector | PathLike | Sequence[SalienceVector | PathLike] | None,
        probe: ProbeSet | PathLike | Sequence[ProbeSet | PathLike],
        batch_size: int = 8,
        save_dir: PathLike | None = None,
        prefix: str = "csv",
        owner: str = "SalienceEvaluator",
        interval_level: float = 0.8,
        forecast_step: int | None = None,
        domain_metrics: Mapping[str, str] | None = None,
    ) -> None:
        self.owner = owner
        self.interval_level = check_level(interval_level, f"{owner}(interval_level=...)")
        if forecast_step is not None and (not isinstance(forecast_step, int) or isinstance(forecast_step, bool)
                                          or forecast_step < 1):
            raise ValueError(f"{owner}(forecast_step=...) must be None (the run's planned end) or a positive int, the "
                             f"training step whose score is forecast, got {forecast_step!r}.")
        self.forecast_step = forecast_step
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"{owner}(batch_size=...) must be a positive int, got {batch_size!r}.")
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"{owner}(prefix=...) must be a non-empty name without a trailing '/', got {prefix!r}.")
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise ValueError(f"{owner}(save_dir=...) must be a directory path or None, got {type(save_dir).__name__}.")
        vector_list = [] if vectors is None else list(vectors) if isinstance(vectors, (list, tuple)) else [vectors]
        if not vector_list and save_dir is None:
            raise ValueError(
                f"{owner}(vectors=...) is empty; pass at least one vector, or a save_dir to only collect the "
                "per-token losses (e.g. to fit the first vectors later)."
            )
        self.vectors = [self._load(v, SalienceVector, "vectors") for v in vector_list]
        self.domain_vectors = [v for v in self.vectors if v.domains is not None]
        self.domain_metrics = self._check_domain_metrics(domain_metrics)
        unique: dict[str, ProbeSet] = {}
        token_vectors = len(self.vectors) > len(self.domain_vectors)
        if probe is not None or token_vectors or save_dir is not None:
            for p in self._as_list(probe, "probe"):  # a probe given twice is scored once, in the order first given
                p = self._load(p, ProbeSet, "probe")
                unique.setdefault(p.fingerprint, p)
        self.probes = list(unique.values())
        self.groups = self._match()
        self.batch_size = batch_size
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.prefix = prefix
        self.run_id = uuid.uuid4().hex
        # One row per (evaluation, task): what a W&B table shows and what a resumed run continues.
        self.history: list[dict[str, Any]] = []
        # Every evaluation's name, in order (collect-only runs have names but no history rows).
        self.evaluated: list[str] = []
        self._stores: dict[str, LossStore] = {}
        self._shards: dict[tuple[str, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._last: tuple[tuple, Evaluation] | None = None
        self._warned: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ construction helpers
    def _as_list(self, x: Any, name: str) -> list:
        items = [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]
        if not items:
            raise ValueError(f"{self.owner}({name}=...) is empty; pass at least one (token vectors and save_dir need "
                             "the probe; only domain vectors go without).")
        return items

    def _check_domain_metrics(self, mapping: Any) -> dict[str, str]:
        """``mapping`` checked against the domain vectors: every domain mapped to a metric name, nothing else."""
        needed = list(dict.fromkeys(d for v in self.domain_vectors for d in v.domains))
        if not needed:
            if mapping:
                raise ValueError(f"{self.owner}(domain_metrics=...) is given, but no vector is a domain vector; drop "
                                 "it or pass the domain vectors it is for.")
            return {}
        if not isinstance(mapping, Mapping) or not all(isinstance(k, str) and isinstance(m, str) and m
                                                         for k, m in mapping.items()):
            raise ValueError(f"{self.owner}(domain_metrics=...) must map each domain name to the name of the metric "
                             f"the loop logs as its validation loss, e.g. {{{needed[0]!r}: 'val/{needed[0]}/loss'}}, "
                             f"got {mapping!r}.")
        missing = [d for d in needed if d not in mapping]
        unused = [d for d in mapping if d not in needed]
        if missing or unused:
            raise ValueError(f"{self.owner}(domain_metrics=...) must map exactly the domains of the domain vectors "
                             f"{needed}; missing {missing}, not a domain of any vector {unused}.")
        return dict(mapping)

    def _load(self, x: Any, cls: type, name: str) -> Any:
        if isinstance(x, cls):
            return x
        if isinstance(x, (str, os.PathLike)):
            return cls.load(x)
        raise ValueError(f"{self.owner}({name}=...) takes {cls.__name__} objects or paths, got {type(x).__name__}.")

    def _match(self) -> dict[str, list[SalienceVector]]:
        """Probe fingerprint -> the vectors fitted on that probe; a vector without its probe is an error."""
        tasks = [v.task for v in self.vectors]
        dupes = sorted({t for t in tasks if tasks.count(t) > 1})
        if dupes:
            raise ValueError(f"{self.owner}: vectors must have distinct tasks, but several share the task name(s) "
                             f"{dupes}; the metric names would collide. Give each vector its own task.")
        groups: dict[str, list[SalienceVector]] = {p.fingerprint: [] for p in self.probes}
        for v in self.vectors:
            if v.domains is not None:
                continue
            found = [p for p in self.probes if p.fingerprint == v.probe_fingerprint]
            probe = found[0] if found else self.probes[0]
            if not found and (len(self.probes) > 1 or v.probe_fingerprint):
                raise ProbeMismatchError(
                    f"{self.owner}: vector {v.task!r} was fitted on probe {v.probe_fingerprint or '(none recorded)'} "
                    f"({v.n_tokens} tokens), but the probes given are "
                    f"{[f'{p.fingerprint} ({p.n_tokens} tokens)' for p in self.probes]}; pass the probe file shipped "
                    "with the vector."
                )
            v.check_probe(probe)  # refuses a vector that records no probe, or another tokenizer
            groups[probe.fingerprint].append(v)
        return groups

    # ------------------------------------------------------------------ checks before training
    def check_tokenizer(self, tokenizer: Any, hint: str = "") -> None:
        """Raise unless ``tokenizer`` is the one every probe was built with; ``hint`` says how to skip the check."""
        for probe in self.probes:
            try:
                probe.check_tokenizer(tokenizer)
            except ProbeMismatchError:
                raise
            except Exception as e:  # not a Hugging Face tokenizer: its vocabulary cannot be compared
                raise ValueError(
                    f"{self.owner} cannot check the tokenizer {type(tokenizer).__name__} against probe "
                    f"{probe.fingerprint} ({type(e).__name__}: {e}); it needs a Hugging Face tokenizer (with "
                    f"get_vocab()){'; ' + hint if hint else ''}."
                ) from e

    def check_model(self, model: nn.Module, where: str = "the model", hint: str = "") -> None:
        """Raise ValueError if ``model`` cannot score every probe; call it before the first training step.

        Scores two sequences per probe, batch 1: the longest and the one holding the largest token id.
        Between them they reach every position and token id an evaluation feeds the model, so the context
        window and vocabulary are checked for the price of two short forwards. Running out of memory is
        reported as such, not as a context problem.
        """
        for probe in self.probes:
            longest = int(probe.lengths.max())
            top_id = int(probe.input_ids.max())
            holder = int(torch.searchsorted(probe.offsets, int(torch.argmax(probe.input_ids)), right=True)) - 1
            sequences = torch.tensor(sorted({int(torch.argmax(probe.lengths)), holder}))
            try:
                token_losses(model, probe, batch_size=1, sequences=sequences)
            except Exception as e:  # any failure means the model cannot score this probe now
                if _out_of_memory(e):
                    raise ValueError(
                        f"{self.owner} ran out of memory scoring one sequence of probe {probe.fingerprint} "
                        f"({longest} tokens, batch 1) with {where} ({type(e).__name__}: {e}). This is not a context "
                        "or vocabulary problem: free memory before training starts (a smaller batch, fewer models "
                        "on the device), or build the probe with a smaller max_length."
                    ) from e
                raise ValueError(
                    f"{self.owner} cannot compute the probe's token losses with {where} ({type(e).__name__}: {e}); "
                    f"tried on the longest sequence of probe {probe.fingerprint} ({longest} tokens) and the one "
                    f"holding its largest token id ({top_id}). The model must map int64 token ids [B, T] to logits "
                    "[B, T, V] (or return an output with .logits) for sequences that long and ids that large: if "
                    f"its context window is shorter than {longest} tokens, rebuild the probe with a smaller "
                    "max_length; if its vocabulary is smaller, build the probe with the model's own tokenizer"
                    + (f"; {hint}." if hint else ".")
                ) from e

    def open_store(self) -> None:
        """Open (or create) the loss store(s) of ``save_dir`` for this run; call on the writing rank only.

        Call it after a resumed run's state is restored (:meth:`load_state_dict`), so the store sees the
        run's own id. Raises ValueError (a bad directory), :class:`ProbeMismatchError` (another probe's
        store) or :class:`~csv_callback.store.RunMismatchError` (another run's store) before any compute.
        """
        if self.save_dir is None or self._stores:
            return
        stores = {}
        for probe in self.probes:
            root = self.save_dir if len(self.probes) == 1 else self.save_dir / probe.fingerprint
            where = f"{self.owner}(save_dir={str(self.save_dir)!r})"
            try:
                stores[probe.fingerprint] = LossStore(root, probe, run_id=self.run_id)
            except (ProbeMismatchError, RunMismatchError) as e:
                raise type(e)(f"{where}: {e}") from e
            except (OSError, ValueError) as e:  # not a directory, not writable, or a corrupt file in it
                raise ValueError(f"{where} cannot be used ({e}); pass a writable directory (a new one for a new "
                                 "probe or a new run) or save_dir=None.") from e
        self._stores = stores

    # ------------------------------------------------------------------ the evaluation
    def evaluate(
        self,
        model: nn.Module | None,
        step: int,
        *,
        training: bool = False,
        checkpoint: str | None = None,
        tokens_seen: float | None = None,
        extra: dict[str, Any] | None = None,
        params: float | None = None,
        sharding: Sharding | None = None,
        end_step: float | None = None,
        logged: Mapping[str, Any] | None = None,
    ) -> Evaluation:
        """Score the probe(s) with ``model`` as it is now and return the metrics.

        Args:
            model: maps int64 token ids ``[B, T]`` to logits ``[B, T, V]`` (or an output with ``.logits``); None
                when there is no probe (domain vectors only).
            step: the training step of these weights.
            training: True inside a training run, at one of its evaluation points: faults then warn and
                return NaN predictions (training goes on), and the evaluation is named by ``step``. False
                for any other evaluation (other weights, a finished run): faults raise.
            checkpoint: where the weights came from (a file or directory), used to name an evaluation
                outside training.
            tokens_seen, extra: stored with the losses.
            params: the model's parameter count, stored with the losses (the N of a scaling law, as
                ``tokens_seen`` is its D: :mod:`csv_callback.scaling`); None when unknown. The adapters pass
                :func:`parameter_count` of the evaluated model.
            sharding: split the probe across ranks; every rank must call with the same arguments.
            end_step: the step where the run is planned to end (the forecast's target unless ``forecast_step``
                was given); None or inf when unknown.
            logged: the metrics the loop has logged for this evaluation (name -> float or 0-d tensor), from which
                domain vectors read their domains' losses (``domain_metrics``).

        Calling again at the same step with the same weights (the same parameter tensors, none modified in
        place since) returns the previous result without recomputing or storing anything: a trainer that
        evaluates several datasets at one point asks once per dataset, and a ``validate`` right after
        training ends evaluates the weights its last step already did.
        """
        if self.probes and not isinstance(model, nn.Module):
            raise ValueError(f"{self.owner}.evaluate needs the model (a torch module) to score the probe, got "
                             f"{type(model).__name__}.")
        if params is not None and (isinstance(params, bool) or not isinstance(params, (int, float))
                                   or not math.isfinite(params) or params <= 0):
            raise ValueError(f"{self.owner}.evaluate(params=...) is the model's parameter count, a positive number "
                             f"or None when unknown, got {params!r}.")
        domain_values = tuple(_as_float((logged or {}).get(m)) for m in self.domain_metrics.values())
        key = (int(step), weights_key(model) if self.probes else b"", domain_values)
        if self._same_as_last(key, sharding):
            return self._last[1]
        start = time.perf_counter()
        name = f"step-{int(step):09d}" if training else self._fresh_name(step, checkpoint)
        end = self.forecast_step if self.forecast_step is not None else end_step
        forecast_to = float(end) if training and end is not None and math.isfinite(end) and end > 0 else None
        writer = sharding is None or sharding.rank == 0
        if writer and self.save_dir is not None and not self._stores:
            # A loop that never called open_store() still gets its losses saved (or is told why not).
            self.guard(f"open the loss store {self.save_dir}", self.open_store, training=training)
        metrics: dict[str, float] = {}
        n_bad = 0.0  # NaN ("unknown") if some probe's losses could not be computed
        failed = False
        for probe in self.probes:
            losses = self._losses(model, probe, step, training, sharding)
            mean, bad = _summary(losses)
            n_bad += bad
            metrics[self.mean_loss_name(probe)] = mean
            for vector in self.groups[probe.fingerprint]:
                metrics |= self._predict(vector, losses if bad == 0 else None, name, step, forecast_to)
            if losses is None:
                failed = True
                continue
            if bad:
                if writer:  # the losses are the same on every rank: one warning
                    warnings.warn(
                        f"{self.owner}: {int(bad)} of {probe.n_tokens} probe token losses are NaN/inf at step {step} "
                        "(has the model diverged?); the predictions are logged as NaN with extrapolating=1.0, these "
                        f"losses are not saved, and {self.prefix}/nonfinite_losses counts them. A training run goes "
                        "on, though early stopping that monitors a prediction may stop it.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            elif writer and probe.fingerprint in self._stores:
                store = self._stores[probe.fingerprint]
                saved = {**(extra or {}), **({"checkpoint": str(checkpoint)} if checkpoint else {})}
                self.guard(
                    f"save the probe losses of {f'step {step}' if training else name} to {store.root}",
                    functools.partial(store.write, name, losses, step=int(step), tokens_seen=tokens_seen, extra=saved,
                                      params=params),
                    training=training,
                )
        for vector in self.domain_vectors:
            losses = self._domain_losses(vector, logged or {}, step)
            failed = failed or losses is None
            metrics |= self._predict(vector, losses, name, step, forecast_to)
        metrics[f"{self.prefix}/nonfinite_losses"] = n_bad
        if name not in self.evaluated:
            self.evaluated.append(name)
        metrics[f"{self.prefix}/eval_seconds"] = time.perf_counter() - start
        result = Evaluation(name, int(step), metrics)
        # A failure is not remembered: outside training the same weights must raise it.
        self._last = None if failed else (key, result)
        return result

    def _domain_losses(self, vector: SalienceVector, logged: Mapping[str, Any], step: int) -> np.ndarray | None:
        """float64 ``[n_domains]``: ``vector``'s domain losses read from ``logged``; None (warned) where one is
        missing or not finite. Missing at the vector's first evaluation, it is a configuration error: raised."""
        missing = {d: self.domain_metrics[d] for d in vector.domains if self.domain_metrics[d] not in logged}
        if missing and not any(r["task"] == vector.task for r in self.history):
            raise ValueError(
                f"{self.owner}: domain vector {vector.task!r} reads its domains' validation losses from the metrics "
                f"{missing}, which are not among the metrics logged at step {step}: {sorted(logged)[:40]}. Map each "
                "domain to a metric the loop logs (domain_metrics=...), logged before this evaluation reads them "
                "(in Lightning from validation_step, not from on_validation_epoch_end)."
            )
        values = {d: _as_float(logged.get(m)) for d, m in self.domain_metrics.items() if d in vector.domains}
        bad = {d: v for d, v in values.items() if not math.isfinite(v)}
        if missing or bad:
            warnings.warn(
                f"{self.owner}: domain vector {vector.task!r} has no finite loss for domain(s) "
                f"{sorted({**missing, **bad})} at step {step} (missing: {sorted(missing)}, NaN/inf or not a number: "
                f"{sorted(set(bad) - set(missing))}); its prediction is logged as NaN with extrapolating=1.0 and "
                "training continues.", RuntimeWarning, stacklevel=3)
            return None
        return vector.domain_losses(values)

    def _same_as_last(self, key: tuple, sharding: Sharding | None) -> bool:
        same = self._last is not None and self._last[0] == key
        if sharding is None:
            return same
        # Ranks holding different shards of the weights (FSDP) must still agree, or one would skip the all_gather.
        flags = sharding.all_gather(torch.tensor([float(same)], device=sharding.device))
        return bool(flags.min() > 0)

    def missed(self, step: int) -> bool:
        """Whether the weights at ``step`` (a resumed run's checkpoint) were never evaluated in this run.

        A checkpoint written before its step's validation (``ModelCheckpoint(every_n_train_steps=...)``)
        and a run killed during that validation leave such a step; evaluating it on resume fills the gap.
        """
        return step > 0 and f"step-{int(step):09d}" not in self.evaluated

    def _fresh_name(self, step: int, checkpoint: str | None) -> str:
        label = Path(str(checkpoint).rstrip("/")).name.removesuffix(".ckpt") if checkpoint else ""
        base = f"eval-{label}-step-{int(step):09d}" if label else f"eval-step-{int(step):09d}"
        taken = set(self.evaluated)
        name, k = base, 1
        while name in taken or any(name in s for s in self._stores.values()):
            k += 1
            name = f"{base}-{k}"
        return name

    def _predict(
        self, vector: SalienceVector, losses: torch.Tensor | np.ndarray | None, name: str, step: int,
        forecast_to: float | None,
    ) -> dict[str, float]:
        if losses is None:
            pred, wl, extrapolating, lo, hi = math.nan, math.nan, True, math.nan, math.nan
        else:
            wl = float(vector.weighted_loss(losses))
            pred, extrapolating = float(vector.link(wl)), bool(vector.extrapolates(wl))
            lo, hi = vector.interval(wl, self.interval_level)
        # No interval (no stored residuals, or no losses) is None in the history: NaN is not JSON, and NaN != NaN
        # would make a resumed run's rows differ from the ones it saved.
        row = {"name": name, "step": int(step), "task": vector.task, "pred": pred, "weighted_loss": wl,
               "extrapolating": extrapolating, "pred_lo": _none_if_nan(lo), "pred_hi": _none_if_nan(hi),
               "forecast": None, "forecast_lo": None, "forecast_hi": None}
        # Only a training step evaluated again (a resumed run) replaces its row: other names are fresh.
        self.history = [r for r in self.history if (r["name"], r["task"]) != (name, vector.task)] + [row]
        base = f"{self.prefix}/{vector.task}"
        out = {f"{base}/pred": pred, f"{base}/pred_lo": lo, f"{base}/pred_hi": hi, f"{base}/weighted_loss": wl,
               f"{base}/extrapolating": float(extrapolating)}
        if forecast_to is not None:
            forecast = self._forecast(vector, row, forecast_to)
            row.update(zip(("forecast", "forecast_lo", "forecast_hi"), map(_none_if_nan, forecast)))
            out |= dict(zip((f"{base}/forecast", f"{base}/forecast_lo", f"{base}/forecast_hi"), forecast))
        return out

    def _forecast(self, vector: SalienceVector, row: dict[str, Any], end: float) -> tuple[float, float, float]:
        """``(forecast, lo, hi)`` of ``vector``'s score at step ``end`` from this run's training history up to
        ``row`` (this evaluation's, already in the history, so the last by step); the rules are in the class
        docstring (:func:`~csv_callback.forecast.running_forecast`)."""
        points = sorted((r["step"], math.nan if r["weighted_loss"] is None else r["weighted_loss"])
                        for r in self.history
                        if r["task"] == vector.task and r["name"].startswith("step-") and r["step"] <= row["step"])
        x, wl = zip(*points)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            forecast = running_forecast(x, wl, end, vector, self.interval_level)
        for w in caught:  # e.g. a prior that starts later than this run's first validations: once per message
            if (vector.task, str(w.message)) not in self._warned:
                self._warned.add((vector.task, str(w.message)))
                warnings.warn(f"{self.owner}: forecast of {vector.task!r}: {w.message}", w.category, stacklevel=4)
        return forecast

    def _losses(
        self, model: nn.Module, probe: ProbeSet, step: int, training: bool, sharding: Sharding | None
    ) -> torch.Tensor | None:
        """float32 ``[probe.n_tokens]`` on the CPU, identical on every rank; None if some rank failed in training."""
        sequences = None
        if sharding is not None:
            shards = self._shard(probe, sharding.world_size)
            sequences = shards[0][sharding.rank]
        error: Exception | None = None
        try:
            local = token_losses(model, probe, batch_size=self.batch_size, sequences=sequences)
        except Exception as e:  # decided on below, once every rank knows whether any rank failed
            local, error = None, e
        if sharding is None:
            losses, failed = local, [0] if error is not None else []
        else:
            losses, failed = self._gather(probe, local, sharding)
        if not failed:
            return losses
        if not training:
            if error is not None:
                raise error
            raise RuntimeError(f"{self.owner}: rank(s) {failed} could not compute the token losses of probe "
                               f"{probe.fingerprint}; their error is in their output.")
        if error is not None:  # the failing rank is the one that knows the error
            rank = "" if sharding is None else f"[rank {sharding.rank}] "
            warnings.warn(
                f"{rank}{self.owner} could not compute the token losses of probe {probe.fingerprint} at step {step} "
                f"({type(error).__name__}: {error}); this evaluation's predictions are skipped (logged as NaN with "
                "extrapolating=1.0, no losses saved) and training continues.", RuntimeWarning, stacklevel=3)
        elif sharding.rank == 0:
            warnings.warn(f"{self.owner}: rank(s) {failed} could not compute the token losses of probe "
                          f"{probe.fingerprint} at step {step} (see their warning); this evaluation's predictions "
                          "are skipped on every rank and training continues.", RuntimeWarning, stacklevel=3)
        return None

    def _shard(self, probe: ProbeSet, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if (probe.fingerprint, world) not in self._shards:
            self._shards[(probe.fingerprint, world)] = shard(probe, world)
        return self._shards[(probe.fingerprint, world)]

    def _gather(
        self, probe: ProbeSet, local: torch.Tensor | None, sharding: Sharding
    ) -> tuple[torch.Tensor, list[int]]:
        """The full loss vector ``[probe.n_tokens]`` from every rank's shard, and the ranks whose shard failed."""
        positions = self._shard(probe, sharding.world_size)[1]
        world, rank = sharding.world_size, sharding.rank
        width = max(len(p) for p in positions)
        # A failed rank still joins the all_gather (the others would wait for it forever) and flags its
        # failure in one extra slot, so that every rank skips this evaluation together.
        padded = torch.full((width + 1,), math.nan, dtype=torch.float32)
        n_local = len(positions[rank])
        if local is None:
            padded[width] = 1.0
        else:
            padded[:n_local] = local[:n_local]  # drops the losses of the padding sequence, if any
            padded[width] = 0.0
        gathered = sharding.all_gather(padded.to(sharding.device)).reshape(world, width + 1).cpu()
        out = torch.empty(probe.n_tokens, dtype=torch.float32)
        for r, pos in enumerate(positions):
            out[pos] = gathered[r, : len(pos)]
        return out, torch.nonzero(gathered[:, width]).flatten().tolist()

    # ------------------------------------------------------------------ faults
    def guard(self, what: str, fn: Callable[..., Any], *args: Any, training: bool = True) -> None:
        """Run a side output ``fn(*args)`` (a save, a logger call); inside training a failure (a full disk, a
        tracker error) warns ``"<owner> could not <what> (...); training continues."`` instead of killing the run."""
        try:
            fn(*args)
        except Exception as e:  # hours of training matter more than one lost side output
            if not training:
                raise
            warnings.warn(f"{self.owner} could not {what} ({type(e).__name__}: {e}); training continues.",
                          RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ names and state
    def mean_loss_name(self, probe: ProbeSet) -> str:
        """The metric name of ``probe``'s mean token loss."""
        if len(self.probes) == 1:
            return f"{self.prefix}/probe_mean_loss"
        return f"{self.prefix}/{probe.fingerprint}/probe_mean_loss"

    def metric_summaries(self) -> dict[str, str]:
        """Metric name -> the summary a tracker should keep (``max`` for scores, ``min`` for losses, ...)."""
        out = {f"{self.prefix}/eval_seconds": "mean", f"{self.prefix}/nonfinite_losses": "max"}
        out |= {self.mean_loss_name(p): "min" for p in self.probes}
        for v in self.vectors:
            base = f"{self.prefix}/{v.task}"
            out |= {f"{base}/pred": "max", f"{base}/pred_lo": "max", f"{base}/pred_hi": "max",
                    f"{base}/weighted_loss": "min", f"{base}/extrapolating": "max", f"{base}/forecast": "last",
                    f"{base}/forecast_lo": "last", f"{base}/forecast_hi": "last"}
        return out

    @property
    def started(self) -> bool:
        """Whether this evaluator has evaluated or opened its store (its run is under way)."""
        return bool(self.evaluated or self._stores)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the run id, the history and the names of the evaluations."""
        return {"version": STATE_VERSION, "run_id": self.run_id, "history": [dict(r) for r in self.history],
                "evaluated": list(self.evaluated), "probes": [p.fingerprint for p in self.probes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run that saved ``state`` (a resumed run): its run id, history and evaluations.

        History rows of tasks this evaluator no longer predicts are dropped and tasks it newly predicts
        start empty, each with a warning; the rows of the tasks that continue are kept. State computed on
        other probes is not loaded (warned): its history would mean something else.
        """
        if not isinstance(state, dict):
            raise ValueError(f"{self.owner}: the saved state is a {type(state).__name__}, not a dict; it is not this "
                             "evaluator's state.")
        probes = [p.fingerprint for p in self.probes]
        if sorted(state.get("probes", [])) != sorted(probes):
            warnings.warn(f"{self.owner}: the saved history was computed on probes {state.get('probes')}, not on "
                          f"{probes}; starting a fresh history (and run).", RuntimeWarning, stacklevel=2)
            return
        history = [_legacy_row(r) for r in state.get("history", [])]
        old, new = {r["task"] for r in history}, {v.task for v in self.vectors}
        if old - new:
            warnings.warn(f"{self.owner}: the resumed run predicted task(s) {sorted(old - new)} that no vector given "
                          "now predicts; their history is dropped.", RuntimeWarning, stacklevel=2)
        if history and new - old:
            warnings.warn(f"{self.owner}: task(s) {sorted(new - old)} are new in the resumed run; their series "
                          "starts now.", RuntimeWarning, stacklevel=2)
        self.history = [r for r in history if r["task"] in new]
        evaluated = state.get("evaluated")
        self.evaluated = list(evaluated) if evaluated is not None else sorted({r["name"] for r in history})
        if state.get("run_id"):
            self.run_id = str(state["run_id"])
        self._last = None


class EvaluatorViews:
    """What every framework adapter shows of its :class:`SalienceEvaluator` (``self.evaluator``), read-only."""

    evaluator: SalienceEvaluator

    @property
    def vectors(self) -> list[SalienceVector]:
        return self.evaluator.vectors

    @property
    def probes(self) -> list[ProbeSet]:
        return self.evaluator.probes

    @property
    def prefix(self) -> str:
        return self.evaluator.prefix

    @property
    def save_dir(self) -> Path | None:
        return self.evaluator.save_dir

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row per (evaluation, task): name, step, task, pred, weighted_loss, extrapolating, pred_lo, pred_hi
        (None where there is no interval), forecast, forecast_lo, forecast_hi (None where nothing was forecast)."""
        return self.evaluator.history


def _legacy_row(row: dict[str, Any]) -> dict[str, Any]:
    """A saved history row in today's form: state version 1 had no names (every row was a training step), and
    rows saved before intervals and forecasts existed have none (None)."""
    return {"name": f"step-{int(row['step']):09d}", "pred_lo": None, "pred_hi": None, "forecast": None,
            "forecast_lo": None, "forecast_hi": None, **row}


def _as_float(value: Any) -> float:
    """A logged metric (a number or a 1-element tensor) as a float; NaN for anything else (None: not logged)."""
    try:
        return float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _out_of_memory(error: Exception) -> bool:
    """Whether ``error`` is an allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _summary(losses: torch.Tensor | None) -> tuple[float, float]:
    """(mean, count of NaN/inf) of ``losses`` ``[n_tokens]``; both NaN when they could not be computed."""
    if losses is None:
        return math.nan, math.nan
    return float(losses.double().mean()), float((~torch.isfinite(losses)).sum())


def parameter_count(model: nn.Module) -> int:
    """The number of parameters of ``model``: the sum of ``numel`` over ``model.parameters()``, embeddings included
    (a tied input/output embedding counted once, as ``parameters()`` yields a shared tensor once). The N the
    adapters store with every evaluation; the ladder benchmark's scaling law uses the same count. Under a
    sharded-parameter strategy (FSDP, DeepSpeed ZeRO-3) a rank holds only its shard, and this counts that."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def weights_key(model: nn.Module, chunk: int = 1 << 24) -> bytes:
    """A checksum of the model's current weights: per parameter, the sum and the sum of squares (float64).

    Two states with equal keys are the same weights for every purpose here (equal sums and sums of squares
    of every tensor do not happen by accident after an optimizer step), whether or not the tensors were
    copied, moved or re-broadcast in between. One read of the weights, in chunks of ``chunk`` elements so
    no large temporary is made; one device sync.
    """
    sums = []
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        s1 = torch.zeros((), dtype=torch.float64, device=flat.device)
        s2 = torch.zeros((), dtype=torch.float64, device=flat.device)
        for part in flat.split(chunk):
            part = part.float()
            s1 += part.sum(dtype=torch.float64)
            s2 += torch.dot(part, part).double()
        sums.append(torch.stack([s1, s2]).cpu())
    return torch.cat(sums).numpy().tobytes() if sums else b""


def shard(probe: ProbeSet, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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
        pad = order[:1].repeat(per_rank) if len(s) == 0 else s[:1].repeat(per_rank - len(s))
        shards.append(torch.cat([s, pad]))
        positions.append(torch.cat([torch.arange(int(so[i]), int(so[i + 1])) for i in s.tolist()]
                                   or [torch.empty(0, dtype=torch.int64)]))
    return shards, positions
