"""Fit a salience vector from loss stores and benchmark scores: what ``csv-callback fit`` does, as a function.

The checkpoints are those of one or several loss stores (:func:`~csv_callback.store.load_losses`); their
scores come from lm-eval-harness results files or a CSV (:mod:`csv_callback.lmeval`). Stored checkpoints
without a score are left out with a warning; a score for a checkpoint that is not stored is an error.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import require_str
from .fit import FIT_OPTIONS, fit_salience
from .forecast import trajectory_prior, with_prior
from .lmeval import read_mapping, scores_from_csv, scores_from_lmeval
from .salience import SalienceVector
from .store import LossStore, load_losses


def fit_from_store(
    stores: str | os.PathLike | Sequence[str | os.PathLike],
    task: str,
    lmeval: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    scores: str | os.PathLike | None = None,
    metric: str = "acc",
    filter: str = "none",
    mapping: str | os.PathLike | None = None,
    score_column: str = "score",
    groups: str | None = None,
    trajectory: bool = False,
    **fit_options: Any,
) -> SalienceVector:
    """Fit a vector for ``task`` on the stored checkpoints that have a score.

    Args:
        stores: one loss store directory, or several (e.g. one ``save_dir`` per run), whose checkpoints are then
            named ``<store>/<name>`` (see :func:`~csv_callback.store.load_losses`); they must share one probe.
        task: the task's name, as in the lm-eval results.
        lmeval: lm-eval ``results_*.json`` files and/or output directories holding them. Exactly one of
            ``lmeval`` and ``scores`` is given.
        scores: a CSV with a header and the columns ``checkpoint`` and ``score_column``.
        metric, filter: the lm-eval score read, ``results[task]["<metric>,<filter>"]``; ``metric`` is also the
            vector's (see :func:`~csv_callback.fit.fit_salience` for the score range it implies).
        mapping: with ``lmeval``, a CSV with columns ``model,checkpoint``: lm-eval's recorded model ->
            checkpoint name, for models the automatic matching does not find.
        score_column: with ``scores``, the column holding the score.
        groups: the held-out unit of cross-validation: ``"re:REGEX"`` (the first capture group, or the whole
            match, of each checkpoint's name) or ``"col:NAME"`` (a column of ``scores``). None: random folds
            over checkpoints.
        trajectory: also store the trajectory prior the end-of-run forecast uses
            (:func:`~csv_callback.forecast.trajectory_prior`), from every stored checkpoint, scored or not: each store
            is one complete run (a training run's ``save_dir``), its last step the run's end. Needs at least two
            stores and steps recorded with the losses.
        fit_options: ``n_folds``, ``seed``, ``priors``, ``anchor``, ``score_range``, passed to
            :func:`~csv_callback.fit.fit_salience` (which validates them).

    Returns:
        The vector, whose ``fit_report`` also names each fitted checkpoint (``checkpoints``) and where its score
        came from (``score_sources``: a results file, or ``<csv>:<line>``).

    Raises ValueError for a directory that is not a loss store, no or two score sources, a score of a
    checkpoint that is not stored, a group spec that does not give every checkpoint a group, and whatever
    :func:`~csv_callback.fit.fit_salience`, :func:`~csv_callback.store.load_losses` and the score readers
    refuse.
    """
    require_str(task, "task")
    unknown = sorted(set(fit_options) - set(FIT_OPTIONS))
    if unknown:  # before any file is read
        raise TypeError(f"fit_from_store got unknown option(s) {unknown}; it passes only {list(FIT_OPTIONS)} to "
                        "fit_salience.")
    roots = [Path(stores)] if isinstance(stores, (str, os.PathLike)) else [Path(s) for s in stores]
    if not roots:
        raise ValueError("fit_from_store needs at least one loss store directory.")
    if (lmeval is None) == (scores is None):
        raise ValueError("pass the scores either as lm-eval results (lmeval=...) or as a CSV (scores=...), "
                         f"not {'both' if scores is not None else 'neither'}.")
    if mapping is not None and lmeval is None:
        raise ValueError("mapping matches lm-eval's recorded models to checkpoints; a scores CSV names its checkpoints "
                         "itself, so pass mapping only with lmeval=...")
    rule = None if groups is None else _parse_groups(groups, from_csv=scores is not None)
    if trajectory and len(roots) < 2:
        raise ValueError("trajectory=True learns how runs move to their end from several complete runs: pass at least "
                         "two loss stores (one save_dir per run).")
    opened = [LossStore(root) for root in roots]
    for store in opened:
        if store.fingerprint is None:
            raise ValueError(f"{store.root} is not a loss store (no probe.safetensors); run csv-callback collect "
                             "first.")
    probe = opened[0].probe()
    table = load_losses(roots, probe.fingerprint)
    rows = None
    if lmeval is not None:
        got = scores_from_lmeval(lmeval, task, table.names, [e.get("path") for e in table.extra], metric=metric,
                                 filter=filter, mapping=None if mapping is None else read_mapping(mapping),
                                 checkpoint_stores=_stores_of(roots, table.names))
    else:
        got, rows = scores_from_csv(scores, score_column)
    by_name = {s.checkpoint: s for s in got}
    unknown = sorted(set(by_name) - set(table.names))
    if unknown:
        raise ValueError(f"scores name checkpoint(s) {unknown[:5]} that are not in {', '.join(map(str, roots))} "
                         f"(it has e.g. {table.names[:5]}); collect them or fix the names.")
    keep = [i for i, name in enumerate(table.names) if name in by_name]
    if len(keep) < len(table.names):
        warnings.warn(f"{len(table.names) - len(keep)} stored checkpoint(s) have no {task} score and are left out.",
                      stacklevel=2)
    # The trajectory prior reads every stored checkpoint, so the matrix is then not compacted in place.
    X = table.losses[keep] if trajectory else _select_rows(table.losses, keep)
    names = [table.names[i] for i in keep]
    labels = None if rule is None else _groups(rule, names, rows)
    sv = fit_salience(X, np.array([by_name[n].value for n in names]), groups=labels, probe=probe, task=task,
                      metric=metric, **fit_options)
    sv.fit_report.update(checkpoints=names, score_sources=[by_name[n].source for n in names])
    if trajectory:
        runs = [str(store) for store, _ in _stores_of(roots, table.names)]
        sv = with_prior(sv, trajectory_prior(sv, table.losses, table.steps, runs, _run_ends(table.steps, runs)))
    return sv


def _run_ends(steps: np.ndarray, runs: list[str]) -> np.ndarray:
    """``[m]`` the last recorded step of each checkpoint's run; a run with an unrecorded step (-1) is an error."""
    runs_arr = np.asarray(runs, dtype=object)
    end = np.zeros(len(runs), dtype=np.float64)
    for run in dict.fromkeys(runs):
        rows = runs_arr == run
        if (steps[rows] < 1).any():
            raise ValueError(f"{run} holds checkpoints without a training step (step -1 or 0), so it cannot teach the "
                             "forecast how a run moves to its end; collect with --step (or from a training run's "
                             "save_dir), or fit without trajectory.")
        end[rows] = steps[rows].max()
    return end


def _stores_of(roots: list[Path], names: list[str]) -> list[tuple[Path, str]]:
    """``[m]`` (loss store, name within it) of each checkpoint of ``load_losses(roots)``, which names those of
    several stores ``<store>/<name>``, ``<store>`` being the store's path relative to the stores' common parent."""
    if len(roots) == 1:
        return [(roots[0], n) for n in names]
    parent = os.path.commonpath([r.resolve() for r in roots])
    labels = sorted(((r.resolve().relative_to(parent).as_posix() + "/", r) for r in roots),
                    key=lambda lr: -len(lr[0]))  # a store nested in another has the longer label
    return [next((root, n[len(label):]) for label, root in labels if n.startswith(label)) for n in names]


def _select_rows(X: np.ndarray, keep: list[int]) -> np.ndarray:
    """Rows ``keep`` (ascending) of X, compacted in place: no second copy of a matrix that can be gigabytes."""
    if len(keep) == X.shape[0]:
        return X
    for dst, src in enumerate(keep):
        if dst != src:
            X[dst] = X[src]
    return X[: len(keep)]


def _parse_groups(spec: str, from_csv: bool) -> re.Pattern | str:
    """The rule of a ``groups`` spec: a compiled ``re:REGEX``, or the column name of ``col:NAME`` (which needs the
    scores from a CSV, ``from_csv``); checked before any losses are read."""
    kind, _, arg = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind == "re":
        try:
            return re.compile(arg)
        except re.error as e:
            raise ValueError(f"groups {spec!r}: bad regular expression ({e}).") from None
    if kind == "col":
        if not from_csv:
            raise ValueError("groups 'col:NAME' reads a column of the scores CSV; with lm-eval results use 're:REGEX'.")
        return arg
    raise ValueError(f"groups must be 're:REGEX' or 'col:NAME', got {spec!r}.")


def _groups(rule: re.Pattern | str, names: list[str], rows: list[dict[str, str]] | None) -> list[str]:
    """Group labels ``[m]`` of the checkpoints ``names`` by ``rule`` (see :func:`_parse_groups`); ``rows`` are the
    scores CSV's."""
    if isinstance(rule, re.Pattern):
        out = []
        for n in names:
            m = rule.search(n)
            if m is None:
                raise ValueError(f"groups 're:{rule.pattern}' does not match checkpoint {n!r}; every checkpoint needs "
                                 "a group.")
            out.append(m.group(1) if rule.groups else m.group(0))
        return out
    if rule not in rows[0]:
        raise ValueError(f"groups 'col:{rule}': the scores CSV has no column {rule!r}; it has {sorted(rows[0])}.")
    col = {r["checkpoint"]: r[rule] for r in rows}
    return [col[n] for n in names]
