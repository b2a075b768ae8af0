"""Per-token probe losses of saved checkpoints, written to a :class:`~csv_callback.store.LossStore`.

Two kinds of checkpoint are read: a Hugging Face model directory (``config.json`` plus weights, loaded
with ``AutoModelForCausalLM.from_pretrained``) and a Lightning ``.ckpt`` file, loaded with
``ModuleClass.load_from_checkpoint``.

Trust model: a ``.ckpt`` file is a pickle. It is read with ``torch.load(weights_only=True)``, which only
rebuilds tensors and plain containers and cannot run code; a checkpoint whose hyperparameters hold other
objects then fails with a message, and ``trust_checkpoints=True`` unpickles it fully (only do that for
files you wrote yourself). The module class named by the user is imported, so it is trusted by definition.
HF directories are read by transformers (safetensors, or ``torch.load(weights_only=True)`` for .bin).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import pickle
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .losses import token_losses
from .probe import ProbeMismatchError, ProbeSet
from .store import LossStore

_STEP = re.compile(r"(?:step|checkpoint|ckpt|iter)[-_=]?(\d+)", re.IGNORECASE)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint path is missing, duplicated, of an unknown kind or cannot be loaded."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint to evaluate: its store name, resolved path, kind (``"hf"`` or ``"lightning"``), step."""

    name: str
    path: Path
    kind: str
    step: int | None


def resolve_checkpoints(paths: Sequence[str | os.PathLike], name_parts: int = 1) -> list[Checkpoint]:
    """Validate checkpoint paths and name each by its last ``name_parts`` path components.

    Raises CheckpointError for a missing path, a directory without ``config.json``, a file that is not
    ``.ckpt``, the same checkpoint given twice, or two checkpoints with the same name.
    """
    if not paths:
        raise CheckpointError("no checkpoints given.")
    if not isinstance(name_parts, int) or name_parts < 1:
        raise CheckpointError(f"name_parts must be a positive int, got {name_parts!r}.")
    out: list[Checkpoint] = []
    by_path: dict[Path, str] = {}
    by_name: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.exists():
            raise CheckpointError(f"{raw}: no such checkpoint directory or file.")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise CheckpointError(
                    f"{raw}: not a Hugging Face model directory (no config.json); save it with model.save_pretrained()."
                )
            kind, stem = "hf", path
        elif path.suffix == ".ckpt":
            kind, stem = "lightning", path.with_suffix("")
        else:
            raise CheckpointError(f"{raw}: expected a Hugging Face model directory or a Lightning .ckpt file.")
        if path in by_path:
            raise CheckpointError(f"{raw}: the same checkpoint is given twice; list each checkpoint once.")
        name = "/".join(stem.parts[-name_parts:])
        if name in by_name:
            raise CheckpointError(
                f"{raw} and {by_name[name]} would both be named {name!r}; pass --name-parts "
                f"{name_parts + 1} to name checkpoints by more of their path."
            )
        by_path[path], by_name[name] = name, path
        out.append(Checkpoint(name=name, path=path, kind=kind, step=_step_of(path, kind)))
    return out


def check_tokenizers(checkpoints: Sequence[Checkpoint], probe: ProbeSet) -> None:
    """Raise ProbeMismatchError if a checkpoint saved with a tokenizer has not the probe's vocabulary."""
    from transformers import AutoTokenizer

    for ck in checkpoints:
        if ck.kind == "hf" and any((ck.path / f).is_file() for f in _TOKENIZER_FILES):
            tok = AutoTokenizer.from_pretrained(str(ck.path))
            try:
                probe.check_tokenizer(tok)
            except ProbeMismatchError as e:
                raise ProbeMismatchError(f"checkpoint {ck.name} ({ck.path}): {e}") from None


def import_class(spec: str) -> type:
    """``"package.module:ClassName"`` -> the class."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise CheckpointError(f"--module must look like 'package.module:ClassName', got {spec!r}.")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"cannot import {spec!r}: {e}.") from e


def load_model(
    ck: Checkpoint,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    module_class: type | None = None,
    trust_checkpoints: bool = False,
) -> nn.Module:
    """The checkpoint's model on ``device`` in ``dtype``, in eval mode."""
    if ck.kind == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=dtype)
    else:
        if module_class is None:
            raise CheckpointError(f"{ck.path} is a Lightning checkpoint; name its LightningModule with --module pkg.mod:Class.")
        try:
            model = module_class.load_from_checkpoint(str(ck.path), map_location="cpu", weights_only=not trust_checkpoints)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{ck.path} holds objects other than tensors and plain values, which weights_only loading refuses "
                f"({str(e).splitlines()[0]}). If you wrote this file yourself, re-run with --trust-checkpoints."
            ) from None
        model = model.to(dtype=dtype)
    return model.to(device).eval()


def collect(
    checkpoints: Sequence[Checkpoint],
    probe: ProbeSet,
    store: LossStore,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    module_class: type | None = None,
    trust_checkpoints: bool = False,
    progress: bool = True,
) -> list[Checkpoint]:
    """Compute and store the losses of every checkpoint not yet in ``store``; returns those computed.

    One model is in memory at a time. Each row is written atomically as soon as it is computed, so an
    interrupted run loses at most the checkpoint in flight and a re-run resumes after the last one stored.
    """
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    _check_stored_paths(checkpoints, store)
    todo = [ck for ck in checkpoints if ck.name not in store]
    bar = tqdm(todo, unit="ckpt", desc="collect", disable=not progress, dynamic_ncols=True)
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-load bars would break up ours
    try:
        done = _collect_loop(bar, probe, store, device, dtype, batch_size, module_class, trust_checkpoints)
    finally:
        bar.close()
        if hf_bars:
            hf_logging.enable_progress_bar()
    return done


def _collect_loop(bar, probe, store, device, dtype, batch_size, module_class, trust_checkpoints) -> list[Checkpoint]:
    done = []
    for ck in bar:
        bar.set_postfix_str(ck.name, refresh=False)
        model = load_model(ck, device, dtype, module_class, trust_checkpoints)
        if hasattr(model, "get_input_embeddings") and int(probe.input_ids.max()) >= model.get_input_embeddings().num_embeddings:
            raise ProbeMismatchError(
                f"checkpoint {ck.name}: the probe uses token ids up to {int(probe.input_ids.max())} but the model's "
                f"vocabulary has {model.get_input_embeddings().num_embeddings} entries; it was trained with another tokenizer."
            )
        losses = token_losses(model, probe, batch_size=batch_size)
        store.write(ck.name, losses, step=ck.step, extra={"path": str(ck.path), "kind": ck.kind, "dtype": str(dtype)})
        # One model at a time: peak memory must not grow with the number of checkpoints. Reference counting
        # frees an HF model at once; a full gc pass (0.15 s, 5% of a small checkpoint's time) only when a
        # reference cycle keeps it alive.
        alive = weakref.ref(model)
        del model
        if alive() is not None:
            gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        done.append(ck)
    return done


def _check_stored_paths(checkpoints: Sequence[Checkpoint], store: LossStore) -> None:
    """A name already in the store must be the same checkpoint, or a resume would silently skip a new one."""
    from safetensors import safe_open

    for ck in checkpoints:
        if ck.name in store:
            with safe_open(str(store.path_for(ck.name)), framework="pt") as f:
                stored = json.loads((f.metadata() or {}).get("extra", "{}")).get("path")
            if stored is not None and stored != str(ck.path):
                raise CheckpointError(
                    f"{store.root} already holds a checkpoint named {ck.name!r}, collected from {stored}, not {ck.path}; "
                    "pass a larger --name-parts or another --out."
                )


def _step_of(path: Path, kind: str) -> int | None:
    """Global step from HF's trainer_state.json, else from a step-like number in the file or directory name."""
    state = path / "trainer_state.json"
    if kind == "hf" and state.is_file():
        try:
            return int(json.loads(state.read_text())["global_step"])
        except (ValueError, KeyError, TypeError):
            pass  # a malformed trainer_state.json only costs the step, which the name may still give
    m = _STEP.findall(path.name)
    return int(m[-1]) if m else None
