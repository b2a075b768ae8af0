"""Fit a domain vector from a table of checkpoints: what ``csv-callback fit TABLE.csv`` does, as a function.

The table has a header and one row per checkpoint: the per-domain validation losses the training loop logged
(e.g. ``loss/c4``, ``loss/wikitext``), the benchmark score and, optionally, a column naming each checkpoint's
group (its run or training corpus) for cross-validation. A W&B run's history exported as CSV is such a table:
rows where a loss or the score was not logged (blank cells) are left out, with a warning.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._checks import require_str
from .fit import FIT_OPTIONS, fit_salience
from .lmeval import read_csv
from .salience import SalienceVector


def fit_from_table(
    table: str | os.PathLike,
    task: str,
    loss_columns: str | Sequence[str],
    score_column: str,
    groups: str | None = None,
    metric: str = "acc",
    **fit_options: Any,
) -> SalienceVector:
    """Fit a domain vector for ``task`` on the rows of a CSV ``table``.

    Args:
        table: a CSV file with a header, one row per checkpoint.
        task: the task's name, stored in the vector.
        loss_columns: shell-style patterns (``fnmatch``) of the loss columns, e.g. ``"loss/*"``, in the order
            the domains are to have (columns matching one pattern in header order). A pattern ``PREFIX*SUFFIX``
            names each domain by what its ``*`` matched (``loss/*`` makes ``loss/c4`` the domain ``c4``); any
            other pattern keeps the whole column name.
        score_column: the column holding the score.
        groups: ``"col:NAME"``, the column naming each checkpoint's held-out unit of cross-validation (its run
            or training corpus); None: random folds over checkpoints.
        metric: the score's metric (see :func:`~csv_callback.fit.fit_salience` for the range it implies).
        fit_options: ``n_folds``, ``seed``, ``priors``, ``anchor``, ``score_range``, passed to
            :func:`~csv_callback.fit.fit_salience`.

    Returns the vector, with ``fit_report["table_rows"]``: the CSV line of each fitted checkpoint.

    Raises ValueError for a pattern that matches no column or a column twice, two columns that make one domain
    name, a cell that is not a number, no row with every value, and what :func:`fit_salience` refuses.
    """
    require_str(task, "task")
    require_str(score_column, "score_column")
    unknown = sorted(set(fit_options) - set(FIT_OPTIONS))
    if unknown:
        raise TypeError(f"fit_from_table got unknown option(s) {unknown}; it passes only {list(FIT_OPTIONS)} to "
                        "fit_salience.")
    patterns = [loss_columns] if isinstance(loss_columns, str) else list(loss_columns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"loss_columns must be one or more column patterns such as 'loss/*', got {loss_columns!r}.")
    group_column = _group_column(groups)
    rows = read_csv(table, [score_column] + ([group_column] if group_column else []))
    header = list(rows[0])
    columns, domains = _loss_columns(header, patterns, exclude={score_column, group_column})
    losses, scores, labels, lines = [], [], [], []
    skipped = 0
    for line, row in enumerate(rows, start=2):
        cells = [row[c] for c in columns] + [row[score_column]]
        if any(not c.strip() for c in cells):  # a step where the loop did not log every value (a W&B export)
            skipped += 1
            continue
        values = [_number(c, table, line, name) for c, name in zip(cells, [*columns, score_column])]
        if not all(math.isfinite(v) for v in values):
            skipped += 1
            continue
        losses.append(values[:-1])
        scores.append(values[-1])
        labels.append(row[group_column] if group_column else None)
        lines.append(line)
    if skipped:
        warnings.warn(f"{table}: {skipped} of {len(rows)} row(s) lack a loss or the score (blank, NaN or inf) and are "
                      "left out.", stacklevel=2)
    if not losses:
        raise ValueError(f"{table}: no row has every loss column {columns} and {score_column!r} filled in; nothing "
                         "to fit.")
    sv = fit_salience(np.array(losses), np.array(scores), groups=labels if group_column else None, task=task,
                      metric=metric, domains=domains, **fit_options)
    sv.fit_report["table_rows"] = lines
    return sv


def _group_column(groups: str | None) -> str | None:
    if groups is None:
        return None
    kind, _, name = groups.partition(":") if isinstance(groups, str) else ("", "", "")
    if kind != "col" or not name:
        raise ValueError(f"groups for a table must be 'col:NAME' (the column naming each checkpoint's run or corpus), "
                         f"got {groups!r}.")
    return name


def _loss_columns(header: list[str], patterns: list[str], exclude: set) -> tuple[list[str], list[str]]:
    """The columns of ``header`` each pattern matches (in header order, patterns in turn) and their domain names."""
    columns: list[str] = []
    domains: list[str] = []
    for pattern in patterns:
        found = [c for c in header if fnmatch.fnmatchcase(c, pattern) and c not in exclude]
        if not found:
            raise ValueError(f"loss column pattern {pattern!r} matches no column; the header is {header}.")
        twice = [c for c in found if c in columns]
        if twice:
            raise ValueError(f"loss column(s) {twice} are matched by more than one pattern; name each column once.")
        parts = re.fullmatch(r"([^*?\[\]]*)\*([^*?\[\]]*)", pattern)
        for c in found:
            columns.append(c)
            domains.append(c[len(parts[1]) : len(c) - len(parts[2])] if parts else c)
    clash = sorted({d for d in domains if domains.count(d) > 1})
    if clash:
        raise ValueError(f"loss columns {columns} make the domain name(s) {clash} more than once; use patterns that "
                         "keep the names apart (e.g. the whole column names).")
    return columns, domains


def _number(cell: str, table: Any, line: int, column: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"{table}, line {line}: {column}={cell!r} is not a number.") from None
