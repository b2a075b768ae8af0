"""On-disk store of per-token probe losses, one file per evaluated checkpoint.

Layout of a store directory (written by ``SalienceCallback(save_dir=...)`` and ``csv-callback collect``)::

    <dir>/probe.safetensors                     the probe the losses index (ProbeSet.save)
    <dir>/run.json                              the training run that writes the store (training callbacks only):
                                                {"format": "csv_callback.run/1", "run_id": "<id>"}
    <dir>/losses/<name>.safetensors             one checkpoint: tensor "losses" float32 [n_tokens]
                                                metadata: format, name, step, tokens_seen, params, fingerprint,
                                                extra (JSON); params (the model's parameter count) is missing
                                                from files written before it was recorded: read as NaN

A training callback opens its store with the id of its run (``LossStore(root, probe, run_id)``): a fresh
run claims a new directory by writing ``run.json``, a resumed run restores its id and finds its own, and a
directory holding another run's losses is refused (:class:`RunMismatchError`), so two runs never mix their
steps in one store. ``csv-callback collect`` and readers open stores without a run id and check none.

One file per checkpoint, each written to a temporary file and renamed into place, means a crash or a full
disk can lose at most the checkpoint being written, never one already saved; re-writing a checkpoint (a
resumed run re-evaluating a step) replaces it instead of duplicating it, but another checkpoint whose name
maps to the same file name never does. :func:`load_losses` reads the whole store as an ``[m, n]`` matrix in
one call, checking every file against the store's probe. Only regular files are read (a FIFO would block the
reader), and opening a store deletes the temporary files writers killed mid-write left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ._checks import as_float_array, require_str
from .files import NAME_MAX, atomic_save, atomic_write, remove_stale_temps, require_regular_file
from .probe import ProbeMismatchError, ProbeSet

FORMAT = "csv_callback.losses/1"
RUN_FORMAT = "csv_callback.run/1"
_SUFFIX = ".safetensors"
_INT64 = range(-(2**63), 2**63)  # steps are returned as int64
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._=-]+")
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors dtype names a loss file may hold (written: F32)


class RunMismatchError(ValueError):
    """A training run opened a loss store that another run writes (see the module docstring)."""


@dataclass
class LossTable:
    """Per-token losses of m checkpoints on one probe.

    Attributes:
        losses: float32 ``[m, n_tokens]``, rows sorted by (step, name).
        names: ``[m]`` checkpoint names.
        steps: int64 ``[m]`` global steps (-1 where unknown).
        tokens_seen: float64 ``[m]`` training tokens seen (NaN where unknown).
        params: float64 ``[m]`` parameter count of the evaluated model (NaN where unknown), the N of a scaling law
            (:mod:`csv_callback.scaling`).
        fingerprint: the probe fingerprint shared by all rows.
        extra: ``[m]`` free-form metadata stored with each row.
    """

    losses: np.ndarray
    names: list[str]
    steps: np.ndarray
    tokens_seen: np.ndarray
    fingerprint: str
    extra: list[dict[str, Any]] = field(default_factory=list)
    params: np.ndarray | None = None

    def __post_init__(self) -> None:
        # Tables built before params existed (by callers that do not know it) read as "unknown" throughout.
        if self.params is None:
            self.params = np.full(len(self.names), np.nan)


def file_name(name: str) -> str:
    """The file name of checkpoint ``name`` in a store: each run of characters other than letters, digits and
    ``._=-`` (``/`` included) becomes one ``_``, so ``"runA/step 1"`` and ``"runA_step_1"`` share a file.

    A name that would give a file name longer than a filesystem allows (255 bytes) is cut, and the first 16
    hex digits of the SHA-256 of the whole name are appended: ``<first 226 characters>-<hash>.safetensors``.
    The file's metadata keeps the whole name.
    """
    safe = _SAFE_NAME.sub("_", name)  # ASCII only: one byte per character
    if len(safe) + len(_SUFFIX) <= NAME_MAX:
        return safe + _SUFFIX
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe[: NAME_MAX - len(_SUFFIX) - len(digest) - 1]}-{digest}{_SUFFIX}"


class LossStore:
    """A directory of per-checkpoint loss files for one probe (see the module docstring).

    Args:
        root: the store's directory, created (with ``probe.safetensors``) if ``probe`` is given.
        probe: the probe the losses are of; None to open an existing store as it is.
        run_id: the training run that writes the store (a fresh id for a fresh run, the restored one for a
            resumed run); None (``collect``, readers) checks and writes no run. A store holding another
            run's losses, or loss files of no recorded run, raises :class:`RunMismatchError`.
    """

    def __init__(self, root: str | os.PathLike, probe: ProbeSet | None = None, run_id: str | None = None) -> None:
        self.root = Path(root)
        self._probe = probe
        self._run_id = None if run_id is None else require_str(run_id, "LossStore: run_id")
        self.fingerprint = probe.fingerprint if probe is not None else None
        self.n_tokens = probe.n_tokens if probe is not None else None
        for d in (self.root, self.root / "losses"):
            remove_stale_temps(d)
        claim = self._run_id is not None and self._check_run()
        probe_file = self.root / "probe.safetensors"
        write_probe = probe is not None and not probe_file.exists()
        if probe_file.exists():
            stored = ProbeSet.load(probe_file)
            if probe is None:
                self.fingerprint, self.n_tokens = stored.fingerprint, stored.n_tokens
            elif stored.fingerprint != probe.fingerprint:
                raise ProbeMismatchError(
                    f"{self.root} holds losses of probe {stored.fingerprint}, not of probe {probe.fingerprint}; "
                    "use a new directory for a new probe."
                )
        if write_probe or claim:
            self._create(write_probe)

    @property
    def run_id(self) -> str | None:
        """The run the store was opened for, None when opened without one."""
        return self._run_id

    def _check_run(self) -> bool:
        """True if the store is this run's to claim (it holds no loss files and no ``run.json``), False if it is
        already this run's; raise :class:`RunMismatchError` if it holds another run's losses."""
        run_file = self.root / "run.json"
        held = _read_run(run_file) if os.path.lexists(run_file) else None
        if held == self._run_id:
            return False
        if held is None and not any((self.root / "losses").glob("*" + _SUFFIX)):
            return True
        writer = f"run {held!r} (recorded in {run_file})" if held is not None else (
            f"a run that recorded no run id ({run_file} is missing: csv-callback collect, or an older csv-callback)")
        raise RunMismatchError(
            f"{self.root} holds the losses of {writer}, and run {self._run_id!r} would mix its own steps into them. "
            f"A fresh run needs a save_dir of its own; to continue that run, resume it from one of its checkpoints "
            f"(which restores its run id); or delete {self.root} to start over."
        )

    def _create(self, write_probe: bool) -> None:
        """Write what a new store holds: ``losses/``, ``probe.safetensors`` (if ``write_probe``) and ``run.json``
        (if the store is opened with a run id)."""
        try:
            (self.root / "losses").mkdir(parents=True, exist_ok=True)
            if write_probe:
                self._probe.save(self.root / "probe.safetensors")
            if self._run_id is not None:
                record = {"format": RUN_FORMAT, "run_id": self._run_id}
                atomic_write(json.dumps(record).encode() + b"\n", self.root / "run.json")
        except OSError as e:  # root is a file, lies under a file, is not writable, or its disk is full
            raise ValueError(
                f"cannot create the loss store {self.root} ({e.strerror or e}); choose a directory path that is "
                "not a file, that you can write to, on a disk with free space."
            ) from e

    def _recreate_if_gone(self) -> None:
        """Recreate the store whole if its ``probe.safetensors`` disappeared since it was opened (``save_dir``
        deleted mid-run), warning once per disappearance; without a probe to recreate it from, raise."""
        probe_file = self.root / "probe.safetensors"
        if probe_file.exists():
            return
        if self._probe is None:
            raise FileNotFoundError(
                f"{probe_file} has disappeared since the store was opened, and the store was opened without a probe "
                f"to write it again; put the probe back, or open the store with LossStore({str(self.root)!r}, probe)."
            )
        self._create(True)
        warnings.warn(
            f"the loss store {self.root} had disappeared (its probe.safetensors was gone: the directory was deleted or "
            "emptied while a run was writing to it); it is recreated with its probe"
            + (" and run.json" if self._run_id is not None else "")
            + ", but the loss files saved in it before are lost: later steps are saved as usual.",
            RuntimeWarning,
            stacklevel=3,
        )

    def path_for(self, name: str) -> Path:
        """The file checkpoint ``name`` is stored in (see :func:`file_name`)."""
        return self.root / "losses" / file_name(name)

    def stored(self, name: str) -> dict[str, Any] | None:
        """The header (name, step, tokens_seen, params, fingerprint, extra, n) of the file ``name`` is stored in, or
        None.

        The header's name can differ from ``name`` when two names map to one :func:`file_name`.
        """
        path = self.path_for(name)
        return _read_header(path) if path.is_file() else None

    def __contains__(self, name: str) -> bool:
        held = self.stored(name)
        return held is not None and held["name"] == name

    def write(
        self,
        name: str,
        losses: torch.Tensor | np.ndarray,
        step: int | None = None,
        tokens_seen: float | None = None,
        extra: dict[str, Any] | None = None,
        params: float | None = None,
    ) -> Path:
        """Store one checkpoint's finite losses ``[n_tokens]`` (one per scored probe token) atomically, replacing
        an earlier row of that name. ``tokens_seen`` (D) and ``params`` (N, the model's parameter count) are
        what a scaling law is fitted on; None records them as unknown.

        Raises ValueError for losses of another length, shape or with NaN/inf, and when the file of ``name``
        already holds another checkpoint (two names with one :func:`file_name`): nothing is written then.
        """
        if self.fingerprint is None:
            raise ValueError(f"{self.root} has no probe.safetensors; open the store with LossStore(root, probe).")
        self._recreate_if_gone()
        arr = as_float_array(losses, f"losses of {name!r}", 1, dtype=np.float32)
        if len(arr) != self.n_tokens:
            raise ValueError(
                f"losses of {name!r} have {len(arr)} entries, but the probe of {self.root} scores {self.n_tokens} "
                "tokens; compute them on that probe (token_losses(model, store.probe()))."
            )
        held = self.stored(name)
        if held is not None and held["name"] != name:
            raise ValueError(
                f"{self.path_for(name)} already holds checkpoint {held['name']!r}, and {name!r} would replace it: both "
                "names give that file name (a store keeps only letters, digits and '._=-'). Rename one of them."
            )
        try:
            if step is not None and int(step) not in _INT64:
                raise ValueError(f"step={step} does not fit int64")
            if params is not None and not (isinstance(params, (int, float, np.number)) and not isinstance(params, bool)
                                           and math.isfinite(params) and params > 0):
                raise ValueError(f"params={params!r} is not a positive parameter count")
            meta = {
                "format": FORMAT,
                "name": name,
                "step": str(-1 if step is None else int(step)),
                "tokens_seen": "nan" if tokens_seen is None else repr(float(tokens_seen)),
                "params": "nan" if params is None else repr(float(params)),
                "fingerprint": self.fingerprint,
                "extra": json.dumps(extra or {}),
            }
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"the metadata of {name!r} cannot be stored ({e}); pass an int step (within int64), a float "
                "tokens_seen, a positive params count (or None) and an extra dict of JSON values."
            ) from e
        path = self.path_for(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"losses": torch.from_numpy(arr)}, meta, path)
        return path

    def probe(self) -> ProbeSet:
        return ProbeSet.load(self.root / "probe.safetensors")


def load_losses(
    root: str | os.PathLike | Sequence[str | os.PathLike], fingerprint: str | None = None
) -> LossTable:
    """Read every checkpoint in one store, or in several, as one ``[m, n]`` float32 matrix (one copy, filled row
    by row).

    Several stores (e.g. the ``save_dir`` of each of several runs, whose checkpoints are all named
    ``step-...``) must share one probe; their checkpoints are named ``<store>/<name>``, where ``<store>`` is
    the store's path relative to the stores' common parent (``runA/probe_losses/step-000001000``), and come
    store by store in the order given. ``fingerprint`` (optional) is the probe the caller expects; a store
    of another probe raises :class:`ProbeMismatchError`. A corrupt or foreign file raises ValueError naming it.
    """
    roots = [Path(root)] if isinstance(root, (str, os.PathLike)) else [Path(r) for r in root]
    if not roots:
        raise ValueError("load_losses needs at least one store directory.")
    if len({r.resolve() for r in roots}) < len(roots):
        raise ValueError(f"the same store is given twice in {[str(r) for r in roots]}; name each store once.")
    labels = [""] if len(roots) == 1 else [
        r.resolve().relative_to(os.path.commonpath([q.resolve() for q in roots])).as_posix() + "/" for r in roots
    ]
    files, heads, expected = [], [], fingerprint
    for r, label in zip(roots, labels):
        for d in (r, r / "losses"):
            remove_stale_temps(d)
        found = sorted((r / "losses").glob("*.safetensors"))
        if not found:
            raise ValueError(f"{r} holds no loss files (expected {r / 'losses' / '*.safetensors'}).")
        store_heads = [_read_header(f) for f in found]
        fps = {h["fingerprint"] for h in store_heads}
        if len(fps) > 1:
            raise ProbeMismatchError(f"{r} mixes losses of several probes {sorted(fps)}; keep one probe per directory.")
        fp = fps.pop()
        by_name: dict[str, Path] = {}
        for f, h in zip(found, store_heads):
            if h["name"] in by_name:
                raise ValueError(
                    f"{by_name[h['name']]} and {f} both hold checkpoint {h['name']!r}; one is a stray copy: delete it."
                )
            by_name[h["name"]] = f
        _check_against_probe(r, fp, found, store_heads)
        if expected is None:
            expected = fp
        elif fp != expected:
            raise ProbeMismatchError(
                f"{r} holds losses of probe {fp}, but probe {expected} was expected "
                f"({'by the caller' if fingerprint else 'the probe of ' + str(roots[0])}); fit or apply vectors "
                "on stores of one probe."
            )
        order = sorted(range(len(found)), key=lambda i: (store_heads[i]["step"], store_heads[i]["name"]))
        files += [found[i] for i in order]
        heads += [{**store_heads[i], "name": label + store_heads[i]["name"]} for i in order]
    _require_length(files, heads, heads[0]["n"], str(files[0]))
    out = np.empty((len(files), heads[0]["n"]), dtype=np.float32)
    for row, (f, h) in enumerate(zip(files, heads)):
        with safe_open(str(f), framework="pt") as g:
            out[row] = g.get_tensor("losses").to(torch.float32).numpy()
        bad = int((~np.isfinite(out[row])).sum())
        if bad:
            raise ValueError(f"{f} (checkpoint {h['name']!r}) holds {bad} NaN or inf loss(es); delete the file and "
                             "re-collect that checkpoint.")
    return LossTable(
        losses=out,
        names=[h["name"] for h in heads],
        steps=np.array([h["step"] for h in heads], dtype=np.int64),
        tokens_seen=np.array([h["tokens_seen"] for h in heads], dtype=np.float64),
        fingerprint=expected,
        extra=[h["extra"] for h in heads],
        params=np.array([h["params"] for h in heads], dtype=np.float64),
    )


def _check_against_probe(root: Path, fingerprint: str, files: list[Path], heads: list[dict[str, Any]]) -> None:
    """Raise unless the loss files of store ``root`` belong to, and have the length of, its probe.safetensors
    (when it has one: a store copied without it is still readable)."""
    probe_file = root / "probe.safetensors"
    if not os.path.lexists(probe_file):
        return
    meta, shape, _ = _tensor_header(probe_file, "answer_mask")
    if meta.get("fingerprint") != fingerprint:
        raise ProbeMismatchError(
            f"{probe_file} is probe {meta.get('fingerprint')}, but the loss files of {root} are of probe "
            f"{fingerprint}; "
            "put back the probe they were collected on, or move them to a store of their own."
        )
    _require_length(files, heads, shape[0], f"the probe of {root}")  # answer_mask has one entry per scored token


def _require_length(files: list[Path], heads: list[dict[str, Any]], n: int, source: str) -> None:
    """Raise naming the first loss file whose length is not ``n``, the length of ``source``."""
    for f, h in zip(files, heads):
        if h["n"] != n:
            raise ValueError(f"{f} holds {h['n']} losses, but {source} has {n}; the file is corrupt or of another "
                             "probe: delete it and re-collect that checkpoint.")


def _read_header(path: Path) -> dict[str, Any]:
    """The metadata of a loss file and its number ``n`` of losses, checked to be a non-empty 1-D float vector."""
    meta, shape, dtype = _tensor_header(path, "losses")
    try:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format={meta.get('format')!r}")
        if int(meta["step"]) not in _INT64:
            raise ValueError(f"step={meta['step']} does not fit int64")
        head = {
            "name": meta["name"],
            "step": int(meta["step"]),
            "tokens_seen": float(meta["tokens_seen"]),
            "params": float(meta.get("params", "nan")),  # not recorded before scaling laws needed it
            "fingerprint": meta["fingerprint"],
            "extra": json.loads(meta["extra"]),
        }
        if not isinstance(head["extra"], dict):
            raise ValueError(f"extra={meta['extra']!r} is not a JSON object")
    except (KeyError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a csv-callback loss file ({e}); delete or re-collect it.") from e
    if len(shape) != 1 or not shape[0] or dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{path}: 'losses' is a {dtype} tensor of shape {shape}, not a non-empty 1-D float vector; the "
            f"file is corrupt or was written by another tool: delete it and re-collect {head['name']!r}."
        )
    return {**head, "n": int(shape[0])}


def _tensor_header(path: Path, tensor: str) -> tuple[dict[str, str], list[int], str]:
    """Metadata, and shape and dtype of ``tensor``, of a .safetensors file, without reading any tensor data."""
    require_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            part = f.get_slice(tensor)
            return f.metadata() or {}, part.get_shape(), part.get_dtype()
    except Exception as e:  # safetensors raises its own types for truncated headers; all mean the same here
        raise ValueError(f"{path} is not a readable .safetensors file with a {tensor!r} tensor ({e}); it is truncated "
                         "or of another format: delete it, or write it again.") from e


def _read_run(path: Path) -> str:
    """The run id recorded in a store's ``run.json``."""
    try:
        record = json.loads(require_regular_file(path).read_text())
        if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
            raise ValueError(f"it is not a {RUN_FORMAT!r} JSON object")
        return require_str(record.get("run_id"), "its run_id")
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(
            f"{path} is not a readable record of the run that writes {path.parent} ({e}); it is corrupt or not "
            f"csv-callback's: use a new save_dir, or delete {path.parent} to start over."
        ) from e
