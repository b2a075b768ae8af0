"""Benchmark scores of checkpoints, read from lm-eval-harness results files or a plain CSV.

lm-eval-harness (>= 0.4) writes one ``results_<timestamp>.json`` per run under
``<output_path>/<sanitized model name>/``. The score of a task is ``results[<task>]["<metric>,<filter>"]``
(e.g. ``results["arc_easy"]["acc,none"]``), and the model is recorded as ``model_name`` (the value of
``pretrained=`` and friends) and in ``config.model_args`` (a dict since 0.4.8, an ``a=b,c=d`` string
before). This module reads exactly that; it does not import lm-eval.

A results file is matched to a checkpoint of a loss store by the recorded model path (``collect`` stores
each checkpoint's resolved path as ``extra["path"]``), by the checkpoint name, or by an explicit mapping
CSV with columns ``model,checkpoint``.

:func:`write_multiple_choice_task` writes the other side: a local custom task that lm-eval runs offline.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: {delimiter}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_multiple_choice_task(
    root: str | os.PathLike, task: str, docs: Sequence[Mapping[str, Any]], target_delimiter: str = " "
) -> Path:
    """Write ``<root>/<task>.yaml`` + ``<task>.jsonl``: an lm-eval-harness multiple-choice task on local data.

    ``docs``: ``{"question": str, "choices": [str, ...], "answer": index of the right choice}``. lm-eval scores
    each choice as the continuation ``target_delimiter + choice`` of ``question``. Pass ``root`` to lm-eval as
    ``--include_path`` (or ``TaskManager(include_path=...)``). Returns the YAML path.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{task}.jsonl"
    data.write_text("".join(json.dumps(dict(d)) + "\n" for d in docs))
    yaml = root / f"{task}.yaml"
    yaml.write_text(_TASK_YAML.format(task=task, data=data.resolve(), delimiter=json.dumps(target_delimiter)))
    return yaml


# lm-eval's own precedence (GeneralConfigTracker._get_model_name): an adapter names the model before its base.
_MODEL_KEYS = ("peft", "delta", "pretrained", "model", "path", "engine")


class ScoresError(ValueError):
    """A results file, score CSV or mapping does not give the scores asked for."""


@dataclass(frozen=True)
class Score:
    """One checkpoint's score and where it came from."""

    checkpoint: str
    value: float
    source: str


def recorded_model(doc: Mapping[str, Any]) -> str | None:
    """The model an lm-eval results document was computed for (``model_name``, else from ``model_args``)."""
    name = doc.get("model_name")
    if isinstance(name, str) and name:
        return name
    args = (doc.get("config") or {}).get("model_args")
    if isinstance(args, str):
        args = dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
    if isinstance(args, Mapping):
        for key in _MODEL_KEYS:
            if args.get(key):
                return str(args[key])
    return None


def read_score(
    doc: Mapping[str, Any], task: str, metric: str = "acc", filter: str = "none", source: str = "results file"
) -> float:
    """``doc["results"][task]["<metric>,<filter>"]`` as a float; ScoresError listing what the file has."""
    results = doc.get("results")
    if not isinstance(results, Mapping):
        raise ScoresError(f"{source}: no 'results' section; is this an lm-eval-harness results_*.json file?")
    if task not in results:
        raise ScoresError(f"{source}: no task {task!r}; the file has tasks {sorted(results)}.")
    key = f"{metric},{filter}"
    entry = results[task]
    if key not in entry:
        have = sorted(k for k in entry if "," in k and not k.split(",")[0].endswith("_stderr"))
        raise ScoresError(f"{source}: task {task!r} has no {key!r}; it has {have} (pass --metric / --filter).")
    value = entry[key]
    if not isinstance(value, (int, float)) or value != value:
        raise ScoresError(f"{source}: {task} {key} is {value!r}, not a number.")
    return float(value)


def find_results_files(paths: Iterable[str | os.PathLike]) -> list[tuple[Path, bool]]:
    """``(file, explicit)`` for each given file and each ``results_*.json`` below each given directory."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("results_*.json"))
            if not found:
                raise ScoresError(f"{p}: no results_*.json below this directory (lm-eval's --output_path).")
            out += [(f, False) for f in found]
        elif p.is_file():
            out.append((p, True))
        else:
            raise ScoresError(f"{p}: no such results file or directory.")
    return out


def scores_from_lmeval(
    paths: Sequence[str | os.PathLike],
    task: str,
    checkpoints: Sequence[str],
    checkpoint_paths: Sequence[str | None] | None = None,
    metric: str = "acc",
    filter: str = "none",
    mapping: Mapping[str, str] | None = None,
) -> list[Score]:
    """Scores of ``task`` from lm-eval results files, each assigned to one of ``checkpoints``.

    Args:
        paths: results files and/or directories searched for ``results_*.json``. A file given
            explicitly must hold ``task``; files found in a directory without it (other tasks' runs)
            are skipped.
        checkpoints: ``[m]`` checkpoint names (e.g. ``LossTable.names``).
        checkpoint_paths: ``[m]`` each checkpoint's model path (``extra["path"]`` of a collected store),
            or None where unknown.
        mapping: recorded model (as lm-eval wrote it) -> checkpoint name; overrides path/name matching.

    Raises ScoresError for a missing task or metric, a model that matches no checkpoint, or two files
    scoring one checkpoint.
    """
    by_path = {}
    for name, p in zip(checkpoints, checkpoint_paths or [None] * len(checkpoints)):
        if p:
            by_path[_norm(p)] = name
    names = set(checkpoints)
    seen: dict[str, Score] = {}
    skipped = []
    for file, explicit in find_results_files(paths):
        doc = _read_json(file)
        if not explicit and task not in (doc.get("results") or {}):
            skipped.append(file)
            continue
        value = read_score(doc, task, metric, filter, str(file))
        model = recorded_model(doc)
        name = _match(model, file, mapping, by_path, names)
        if name in seen:
            raise ScoresError(
                f"checkpoint {name!r} is scored twice for {task!r}: {seen[name].source} and {file}; "
                "delete the stale results file or pass only one of them."
            )
        seen[name] = Score(name, value, str(file))
    if not seen:
        tasks = sorted({t for f in skipped for t in (_read_json(f).get("results") or {})})
        raise ScoresError(f"no results file has task {task!r}; the files found have tasks {tasks}.")
    return list(seen.values())


def scores_from_csv(path: str | os.PathLike, column: str = "score") -> tuple[list[Score], list[dict[str, str]]]:
    """Scores from a CSV with a header and columns ``checkpoint`` and ``column``; also returns all rows."""
    rows = read_csv(path, ("checkpoint", column))
    out, seen = [], set()
    for i, row in enumerate(rows, start=2):
        name = row["checkpoint"]
        if name in seen:
            raise ScoresError(f"{path}, line {i}: checkpoint {name!r} appears twice; keep one score per checkpoint.")
        seen.add(name)
        try:
            value = float(row[column])
        except ValueError:
            raise ScoresError(f"{path}, line {i}: {column}={row[column]!r} is not a number.") from None
        out.append(Score(name, value, f"{path}:{i}"))
    return out, rows


def read_mapping(path: str | os.PathLike) -> dict[str, str]:
    """A CSV with columns ``model,checkpoint``: lm-eval's recorded model (path) -> checkpoint name."""
    rows = read_csv(path, ("model", "checkpoint"))
    out: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        if row["model"] in out:
            raise ScoresError(f"{path}, line {i}: model {row['model']!r} is mapped twice.")
        out[row["model"]] = row["checkpoint"]
    return out


def read_csv(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a headed CSV file; ScoresError if it is missing or lacks a ``required`` column."""
    path = Path(path)
    if not path.is_file():
        raise ScoresError(f"{path}: no such CSV file.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ScoresError(f"{path}: missing column(s) {missing}; the header is {reader.fieldnames}.")
        rows = list(reader)
    if not rows:
        raise ScoresError(f"{path}: no rows after the header.")
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScoresError(f"{path}: not a readable JSON file ({e}).") from e
    if not isinstance(doc, dict):
        raise ScoresError(f"{path}: not an lm-eval results file (top level is not an object).")
    return doc


def _norm(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _match(model: str | None, file: Path, mapping, by_path: dict[str, str], names: set[str]) -> str:
    """The checkpoint a results file belongs to, or ScoresError saying how to tell."""
    if mapping is not None:
        if model in mapping:
            return mapping[model]
        raise ScoresError(f"{file}: model {model!r} is not in the mapping file; add a row '{model},<checkpoint>'.")
    if model is None:
        raise ScoresError(f"{file} records no model path; pass a mapping CSV (columns model,checkpoint).")
    if _norm(model) in by_path:
        return by_path[_norm(model)]
    if model in names:
        return model
    raise ScoresError(
        f"{file}: the model {model!r} matches no collected checkpoint (by path or name); "
        "collect it first, or pass a mapping CSV with columns model,checkpoint."
    )
