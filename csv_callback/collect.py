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
import reprlib
import warnings
import weakref
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ._extras import extra_imports
from .losses import token_losses
from .probe import ProbeMismatchError, ProbeSet
from .store import LossStore, file_name

with extra_imports("cli", __name__):
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
    from transformers.utils import logging as hf_logging

_STEP = re.compile(r"(?:step|checkpoint|ckpt|iter)[-_=]?(\d+)", re.IGNORECASE)
# torch's weights-only unpickler says what it refused in one of these phrases (torch/_weights_only_unpickler.py);
# any other unpickling failure means the bytes themselves are bad, which --trust-checkpoints would not fix.
# A refused GLOBAL whose name is no dotted identifier is garbage bytes read as a name: corruption, not an object.
_REFUSED_OBJECT = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) was not an allowed global|module \S+ is blocked|"
                             r"Can only create new object|Trying to call reduce|must be imported to load")
# What reading a truncated or corrupt checkpoint raises, from zip, torch, safetensors or transformers.
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, SafetensorError)
_LIGHTNING_KEYS = ("pytorch-lightning_version", "state_dict")
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
    ``.ckpt``, the same checkpoint given twice, or two checkpoints with the same name or store file name.
    """
    if not paths:
        raise CheckpointError("no checkpoints given.")
    if not isinstance(name_parts, int) or name_parts < 1:
        raise CheckpointError(f"name_parts must be a positive int, got {name_parts!r}.")
    out: list[Checkpoint] = []
    seen: set[Path] = set()
    by_file: dict[str, Checkpoint] = {}
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
        if path in seen:
            raise CheckpointError(f"{raw}: the same checkpoint is given twice; list each checkpoint once.")
        name = "/".join(stem.parts[-name_parts:])
        # Two names can differ and still share a store file ("mix a" and "mix_a"): the later would overwrite it.
        other = by_file.get(file_name(name))
        if other is not None and other.name == name:
            raise CheckpointError(
                f"{raw} and {other.path} would both be named {name!r}; pass --name-parts "
                f"{name_parts + 1} to name checkpoints by more of their path."
            )
        if other is not None:
            raise CheckpointError(
                f"{raw} and {other.path} would be named {name!r} and {other.name!r}, which a loss store keeps in the "
                f"same file {file_name(name)!r} (it keeps only letters, digits and '._=-'); rename one of them."
            )
        seen.add(path)
        ck = Checkpoint(name=name, path=path, kind=kind, step=_step_of(path, kind))
        by_file[file_name(name)] = ck
        out.append(ck)
    return out


def check_tokenizers(checkpoints: Sequence[Checkpoint], probe: ProbeSet) -> None:
    """Raise ProbeMismatchError if a checkpoint saved with a tokenizer has not the probe's vocabulary."""
    for ck in checkpoints:
        if ck.kind == "hf" and any((ck.path / f).is_file() for f in _TOKENIZER_FILES):
            tok = load_tokenizer(ck.path)
            try:
                probe.check_tokenizer(tok)
            except ProbeMismatchError as e:
                raise ProbeMismatchError(f"checkpoint {ck.name} ({ck.path}): {e}") from None


def load_tokenizer(path: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained`` of a local directory; ValueError naming it if it is missing or broken.

    Only local directories: a name that is not one is not looked up on the Hugging Face Hub, because the probe,
    the store and every vector record the exact vocabulary, which a Hub repository may change under the same name
    (and an offline machine would wait a minute in retries before failing).
    """
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer directory; pass a directory written by "
                                "tokenizer.save_pretrained(). For a Hub tokenizer, save it once: "
                                f"AutoTokenizer.from_pretrained({str(path)!r}).save_pretrained('my_tokenizer').")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # OSError, ValueError, KeyError or the Rust parser's bare Exception, by what is bad
        raise ValueError(f"{path}: cannot load a tokenizer from this directory ({_describe(e)}); write it again "
                         "with tokenizer.save_pretrained().") from e


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` (cuda when available, else cpu) or a torch device string, checked to be usable on this machine."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
        torch.empty(0, device=device)  # initialises the device: fails now, not after the store is created
    except (RuntimeError, AssertionError) as e:  # a bad name, or torch built without / not finding that backend
        raise ValueError(f"device {spec!r} cannot be used on this machine ({_describe(e)}); use cpu, or auto to take "
                         "a GPU when there is one.") from None
    return device


def import_class(spec: str) -> type:
    """``"package.module:ClassName"`` -> the class."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise CheckpointError(f"--module must look like 'package.module:ClassName', got {spec!r}.")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"cannot import {spec!r}: {e}.") from e


def check_loadable(checkpoints: Sequence[Checkpoint], trust_checkpoints: bool = False) -> None:
    """Raise CheckpointError for a checkpoint that cannot be loaded, reading headers but no weights.

    Catches before any model runs or a store is created what would otherwise stop ``collect`` part-way: a bad
    config.json, missing or truncated weight files, a corrupt ``.ckpt``, one that holds objects weights-only
    loading refuses, or a ``.ckpt`` that is not a Lightning checkpoint.
    """
    for ck in checkpoints:
        with _loading(ck, trust_checkpoints):
            if ck.kind == "hf":
                AutoConfig.from_pretrained(str(ck.path))
                for f in _hf_weight_files(ck.path):
                    if f.suffix == ".safetensors":
                        with safe_open(str(f), framework="pt"):
                            pass  # opening checks the header and that the file is as long as it says
                    else:
                        _torch_load(f, weights_only=True)
            else:
                ckpt = _torch_load(ck.path, weights_only=not trust_checkpoints)
                missing = [k for k in _LIGHTNING_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
                if missing:
                    raise KeyError(missing[0])


def load_model(
    ck: Checkpoint,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    module_class: type | None = None,
    trust_checkpoints: bool = False,
) -> nn.Module:
    """The checkpoint's model on ``device`` in ``dtype``, in eval mode; CheckpointError if it cannot be loaded."""
    if ck.kind == "lightning" and module_class is None:
        raise CheckpointError(
            f"{ck.path} is a Lightning checkpoint; name its LightningModule with --module pkg.mod:Class."
        )
    with _loading(ck, trust_checkpoints):
        if ck.kind == "hf":
            model = AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=dtype)
        else:
            model = module_class.load_from_checkpoint(
                str(ck.path), map_location="cpu", weights_only=not trust_checkpoints
            )
            model = model.to(dtype=dtype)
    return model.to(device).eval()


@contextmanager
def _loading(ck: Checkpoint, trust_checkpoints: bool) -> Iterator[None]:
    """Turn the many ways reading a checkpoint fails into one CheckpointError naming it and the fix."""
    save = "model.save_pretrained()" if ck.kind == "hf" else "Trainer.save_checkpoint()"
    try:
        yield
    except KeyError as e:
        raise CheckpointError(f"{ck.path} is not a {'Lightning' if ck.kind == 'lightning' else 'complete'} checkpoint: "
                              f"it has no {e.args[0]!r} entry; save it with {save}.") from None
    except (TypeError, *_UNREADABLE) as e:
        refused = isinstance(e, pickle.UnpicklingError) and _REFUSED_OBJECT.search(str(e))
        if refused and ck.kind == "lightning" and not trust_checkpoints:  # the only load --trust-checkpoints changes
            raise CheckpointError(
                f"{ck.path} holds objects other than tensors and plain values "
                f"({refused.group(1) or refused.group(0)}), "
                "which weights_only loading refuses. If you wrote this file yourself, re-run with --trust-checkpoints."
            ) from None
        # The checkpoint was read, but the --module class cannot take its hyperparameters (TypeError from
        # __init__) or its weights (load_state_dict).
        if ck.kind == "lightning" and (isinstance(e, TypeError) or "state_dict" in str(e)):
            raise CheckpointError(f"{ck.path} does not fit the --module class ({_describe(e)}); pass the "
                                  "LightningModule it was trained with.") from None
        if isinstance(e, TypeError):
            raise  # any other TypeError is a bug, not a bad file
        raise CheckpointError(f"{ck.path} cannot be loaded ({_describe(e)}); it is incomplete, truncated or corrupt: "
                              f"copy it again or re-save it with {save}.") from None


def _hf_weight_files(path: Path) -> list[Path]:
    """The weight files of an HF model directory (the shards its index names, or the single file)."""
    for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            return [path / shard for shard in shards]  # a missing shard fails when it is opened
    for single in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(f"no weights ({SAFE_WEIGHTS_NAME} or {WEIGHTS_NAME}) next to config.json; the save did not "
                            "finish")


def _torch_load(path: Path, weights_only: bool) -> Any:
    """``torch.load`` memory-mapped when the file is a zip archive, so that no tensor data is read."""
    return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=zipfile.is_zipfile(path))


def _describe(e: BaseException) -> str:
    """``"Type: first line of the message"``, cut to its first sentence when long. torch's weights-only errors
    put the informative line after a preamble of advice, which is skipped."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(line) > 160:
        line = line.split(". ")[0]
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def collect(
    checkpoints: Sequence[Checkpoint],
    probe: ProbeSet,
    store: LossStore | str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    module_class: type | None = None,
    trust_checkpoints: bool = False,
    progress: bool = True,
) -> list[Checkpoint]:
    """Compute and store the losses of every checkpoint not yet in ``store``; returns those computed.

    ``store`` is a LossStore, or the directory of one: an existing store there is opened (and must be of
    ``probe``) before any model runs, and a new one is created only once the first checkpoint has scored the
    probe, so a model that cannot (a context window shorter than the probe, another vocabulary) leaves
    nothing behind to refuse a retry with a fixed probe.

    One model is in memory at a time. Each row is written atomically as soon as it is computed, so an
    interrupted run loses at most the checkpoint in flight and a re-run resumes after the last one stored.
    An OSError while writing (a full disk) names the checkpoints saved so far.
    """
    root = store.root if isinstance(store, LossStore) else Path(store)
    if not isinstance(store, LossStore):
        store = LossStore(root, probe) if (root / "probe.safetensors").exists() else None
    if store is not None:
        _check_stored_paths(checkpoints, store)
    todo = [ck for ck in checkpoints if store is None or ck.name not in store]
    bar = tqdm(todo, unit="ckpt", desc="collect", disable=not progress, dynamic_ncols=True)
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-load bars would break up ours
    try:
        done = _collect_loop(bar, probe, store, root, device, dtype, batch_size, module_class, trust_checkpoints)
    finally:
        bar.close()
        if hf_bars:
            hf_logging.enable_progress_bar()
    return done


def _collect_loop(
    bar, probe, store, root, device, dtype, batch_size, module_class, trust_checkpoints
) -> list[Checkpoint]:
    done = []
    for ck in bar:
        bar.set_postfix_str(ck.name, refresh=False)
        model = load_model(ck, device, dtype, module_class, trust_checkpoints)
        if (
            hasattr(model, "get_input_embeddings")
            and int(probe.input_ids.max()) >= model.get_input_embeddings().num_embeddings
        ):
            raise ProbeMismatchError(
                f"checkpoint {ck.name}: the probe uses token ids up to {int(probe.input_ids.max())} but the model's "
                f"vocabulary has {model.get_input_embeddings().num_embeddings} entries; it was trained with another "
                f"tokenizer."
            )
        try:
            losses = token_losses(model, probe, batch_size=batch_size)
        except ValueError as e:  # the probe does not fit this model
            raise ValueError(f"checkpoint {ck.name} ({ck.path}): {e}") from None
        if store is None:
            store = LossStore(root, probe)
        try:
            store.write(
                ck.name, losses, step=ck.step, extra={"path": str(ck.path), "kind": ck.kind, "dtype": str(dtype)}
            )
        except OSError as e:
            saved = (
                f"{len(done)} checkpoint(s) of this run are saved in {root} (last: {done[-1].name})"
                if done
                else f"no checkpoint of this run is saved in {root}"
            )
            raise OSError(
                f"checkpoint {ck.name}: {e.strerror or e} {saved}; re-run the same command then: it "
                "continues after them."
            ) from None
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
    """A store file a checkpoint would be written to must hold that same checkpoint or none, or a resume would
    silently skip a new checkpoint or overwrite another."""
    for ck in checkpoints:
        held = store.stored(ck.name)
        if held is not None and held["name"] != ck.name:
            raise CheckpointError(
                f"{store.path_for(ck.name)} already holds checkpoint {held['name']!r}, and {ck.name!r} ({ck.path}) "
                "would be stored in the same file (a store keeps only letters, digits and '._=-' of a name); rename "
                "the checkpoint or pass another --out."
            )
        if held is not None:
            stored = held["extra"].get("path")
            if stored is not None and stored != str(ck.path):
                raise CheckpointError(
                    f"{store.root} already holds a checkpoint named {ck.name!r}, collected from {stored}, not "
                    f"{ck.path}; "
                    "pass a larger --name-parts or another --out."
                )


def _step_of(path: Path, kind: str) -> int | None:
    """Global step from HF's trainer_state.json, else from a step-like number in the file or directory name.

    A step must be a whole number a loss file can record (0 to 2**63 - 1): a malformed trainer_state.json
    (``1e999``, deeply nested, not JSON) only costs the step, which the name may still give, with a warning.
    """
    state = path / "trainer_state.json"
    if kind == "hf" and state.is_file():
        try:
            value = json.loads(state.read_text())["global_step"]
            problem = f"global_step is {reprlib.repr(value)}, not a step number"
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            value, problem = None, f"no readable global_step ({type(e).__name__}: {reprlib.repr(str(e))})"
        step = _as_step(value)
        if step is not None:
            return step
        warnings.warn(f"{state}: {problem}; the step is taken from the name {path.name!r} instead.", stacklevel=2)
    m = _STEP.findall(path.name)
    return _as_step(int(m[-1])) if m else None


def _as_step(value: Any) -> int | None:
    """``value`` as a step (an int, or a float with no fraction, within 0 .. 2**63 - 1), else None."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        return None
    return value
