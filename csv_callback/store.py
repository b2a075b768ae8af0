"""On-disk store of per-token probe losses, one file per evaluated checkpoint.

Layout of a store directory (written by ``SalienceCallback(save_dir=...)`` and ``csv-callback collect``)::

    <dir>/probe.safetensors                     the probe the losses index (ProbeSet.save)
    <dir>/losses/<name>.safetensors             one checkpoint: tensor "losses" float32 [n_tokens]
                                                metadata: format, name, step, tokens_seen, fingerprint, extra (JSON)

One file per checkpoint, each written to a temporary file and renamed into place, means a crash or a full
disk can lose at most the checkpoint being written, never one already saved; re-writing a checkpoint (a
resumed run re-evaluating a step) replaces it instead of duplicating it. :func:`load_losses` reads the
whole store as an ``[m, n]`` matrix in one call.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ._checks import as_float_array
from .probe import ProbeMismatchError, ProbeSet, atomic_save, read_safetensors

FORMAT = "csv_callback.losses/1"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._=-]+")


@dataclass
class LossTable:
    """Per-token losses of m checkpoints on one probe.

    Attributes:
        losses: float32 ``[m, n_tokens]``, rows sorted by (step, name).
        names: ``[m]`` checkpoint names.
        steps: int64 ``[m]`` global steps (-1 where unknown).
        tokens_seen: float64 ``[m]`` training tokens seen (NaN where unknown).
        fingerprint: the probe fingerprint shared by all rows.
        extra: ``[m]`` free-form metadata stored with each row.
    """

    losses: np.ndarray
    names: list[str]
    steps: np.ndarray
    tokens_seen: np.ndarray
    fingerprint: str
    extra: list[dict[str, Any]] = field(default_factory=list)


class LossStore:
    """A directory of per-checkpoint loss files for one probe (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, probe: ProbeSet | None = None) -> None:
        self.root = Path(root)
        self.fingerprint = probe.fingerprint if probe is not None else None
        probe_file = self.root / "probe.safetensors"
        if probe is not None:
            if probe_file.exists():
                stored = ProbeSet.load(probe_file)
                if stored.fingerprint != probe.fingerprint:
                    raise ProbeMismatchError(
                        f"{self.root} holds losses of probe {stored.fingerprint}, not of probe {probe.fingerprint}; "
                        "use a new directory for a new probe."
                    )
            else:
                (self.root / "losses").mkdir(parents=True, exist_ok=True)
                probe.save(probe_file)
        elif probe_file.exists():
            self.fingerprint = ProbeSet.load(probe_file).fingerprint

    def path_for(self, name: str) -> Path:
        return self.root / "losses" / f"{_SAFE_NAME.sub('_', name)}.safetensors"

    def __contains__(self, name: str) -> bool:
        return self.path_for(name).is_file()

    def write(
        self,
        name: str,
        losses: torch.Tensor | np.ndarray,
        step: int | None = None,
        tokens_seen: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Store one checkpoint's losses ``[n_tokens]`` atomically, replacing an earlier row of that name."""
        if self.fingerprint is None:
            raise ValueError(f"{self.root} has no probe.safetensors; open the store with LossStore(root, probe).")
        arr = as_float_array(losses, f"losses of {name!r}", 1, dtype=np.float32)
        meta = {
            "format": FORMAT,
            "name": name,
            "step": str(-1 if step is None else int(step)),
            "tokens_seen": "nan" if tokens_seen is None else repr(float(tokens_seen)),
            "fingerprint": self.fingerprint,
            "extra": json.dumps(extra or {}),
        }
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
        found = sorted((r / "losses").glob("*.safetensors"))
        if not found:
            raise ValueError(f"{r} holds no loss files (expected {r / 'losses' / '*.safetensors'}).")
        store_heads = [_read_header(f) for f in found]
        fps = {h["fingerprint"] for h in store_heads}
        if len(fps) > 1:
            raise ProbeMismatchError(f"{r} mixes losses of several probes {sorted(fps)}; keep one probe per directory.")
        fp = fps.pop()
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
    sizes = {h["n"] for h in heads}
    if len(sizes) > 1:
        raise ValueError(f"{', '.join(map(str, roots))}: loss files have different lengths {sorted(sizes)}; some are corrupt.")
    out = np.empty((len(files), sizes.pop()), dtype=np.float32)
    for row, f in enumerate(files):
        out[row] = read_safetensors(f, FORMAT, ("losses",))[0]["losses"].numpy()
    return LossTable(
        losses=out,
        names=[h["name"] for h in heads],
        steps=np.array([h["step"] for h in heads], dtype=np.int64),
        tokens_seen=np.array([h["tokens_seen"] for h in heads], dtype=np.float64),
        fingerprint=expected,
        extra=[h["extra"] for h in heads],
    )


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            n = f.get_slice("losses").get_shape()[0]
        if meta.get("format") != FORMAT:
            raise ValueError(f"format={meta.get('format')!r}")
        return {
            "name": meta["name"],
            "step": int(meta["step"]),
            "tokens_seen": float(meta["tokens_seen"]),
            "fingerprint": meta["fingerprint"],
            "extra": json.loads(meta["extra"]),
            "n": int(n),
        }
    except Exception as e:  # safetensors raises its own types for truncated headers; all mean the same here
        raise ValueError(f"{path} is not a readable csv-callback loss file ({e}); delete or re-collect it.") from e
