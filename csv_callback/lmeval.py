"""Benchmark scores of checkpoints, read from lm-eval-harness results files or a plain CSV.

lm-eval-harness (>= 0.4) writes one ``results_<timestamp>.json`` per run under
``<output_path>/<sanitized model name>/``. The score of a task is ``results[<task>]["<metric>,<filter>"]``
(e.g. ``results["arc_easy"]["acc,none"]``), and the model is recorded as ``model_name`` (the value of
``pretrained=`` and friends) and in ``config.model_args`` (a dict since 0.4.8, an ``a=b,c=d`` string
before). This module reads exactly that; it does not import lm-eval.

A results file is matched to a checkpoint of a loss store by the recorded model path (``collect`` stores
each checkpoint's resolved path as ``extra["path"]``), by the checkpoint name, by the checkpoint's name
within its store together with where the file lies (runs whose results all record ``step-...``: the file
belongs to the store in the same run directory), or by an explicit mapping CSV with columns
``model,checkpoint``. Only regular files are read: a FIFO named ``results_*.json`` would block forever.

:func:`write_multiple_choice_task` writes the other side: a local custom task that lm-eval runs offline.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import reprlib
import stat
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

_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # it names two files, so no path separators
_DOC_KEYS = ("question", "choices", "answer")


def write_multiple_choice_task(
    root: str | os.PathLike, task: str, docs: Sequence[Mapping[str, Any]], target_delimiter: str = " "
) -> Path:
    """Write ``<root>/<task>.yaml`` + ``<task>.jsonl``: an lm-eval-harness multiple-choice task on local data.

    ``docs``: ``{"question": str, "choices": [str, ...], "answer": index of the right choice}``, at least one,
    each with at least two choices. lm-eval scores each choice as the continuation ``target_delimiter + choice``
    of ``question``. Pass ``root`` to lm-eval as ``--include_path`` (or ``TaskManager(include_path=...)``).
    Returns the YAML path. Raises ValueError, writing nothing, for a bad task name or document.
    """
    if not isinstance(task, str) or not _TASK_NAME.fullmatch(task):
        raise ValueError(f"task name {task!r} must be letters, digits and '_.-' (it names the files <task>.yaml and "
                         "<task>.jsonl).")
    docs = list(docs)
    if not docs:
        raise ValueError("docs is empty; a multiple-choice task needs at least one document.")
    for i, doc in enumerate(docs):
        _check_doc(doc, i)
    try:
        lines = "".join(json.dumps(dict(d)) + "\n" for d in docs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"docs cannot be written as JSON ({e}); keep only str, number, list and dict values.") from e
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{task}.jsonl"
    data.write_text(lines)
    yaml = root / f"{task}.yaml"
    yaml.write_text(_TASK_YAML.format(task=task, data=data.resolve(), delimiter=json.dumps(target_delimiter)))
    return yaml


def _check_doc(doc: Any, i: int) -> None:
    """Raise ValueError unless ``doc`` is a question with >= 2 string choices and the index of the right one."""
    if not isinstance(doc, Mapping) or not all(k in doc for k in _DOC_KEYS):
        have = sorted(doc) if isinstance(doc, Mapping) else type(doc).__name__
        raise ValueError(f"docs[{i}] must be a mapping with keys {list(_DOC_KEYS)}, got {have}.")
    choices, answer = doc["choices"], doc["answer"]
    if not isinstance(doc["question"], str):
        raise ValueError(f"docs[{i}]['question'] must be a str, got {doc['question']!r}.")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"docs[{i}]['choices'] must be a list of at least 2 strings, got {choices!r}.")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"docs[{i}]['answer'] must be the index (0 to {len(choices) - 1}) of the right choice, "
                         f"got {answer!r}.")


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
    if not isinstance(doc, Mapping):
        raise ScoresError(f"an lm-eval results document is a JSON object, got {type(doc).__name__}.")
    name = doc.get("model_name")
    if isinstance(name, str) and name:
        return name
    config = doc.get("config")
    args = config.get("model_args") if isinstance(config, Mapping) else None
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
    results = doc.get("results") if isinstance(doc, Mapping) else None
    if not isinstance(results, Mapping):
        raise ScoresError(f"{source}: no 'results' section; is this an lm-eval-harness results_*.json file?")
    if task not in results:
        raise ScoresError(f"{source}: no task {task!r}; the file has tasks {sorted(results)}.")
    key = f"{metric},{filter}"
    entry = results[task]
    if not isinstance(entry, Mapping):
        raise ScoresError(f"{source}: results[{task!r}] is {entry!r}, not an object of metrics like "
                          "{'acc,none': 0.5}; is this an lm-eval-harness results file?")
    if key not in entry:
        have = sorted(k for k in entry if "," in k and not k.split(",")[0].endswith("_stderr"))
        raise ScoresError(f"{source}: task {task!r} has no {key!r}; it has {have} (pass --metric / --filter).")
    value = _finite(entry[key])
    if value is None:
        raise ScoresError(f"{source}: {task} {key} is {reprlib.repr(entry[key])}, not a finite number.")
    return value


def _finite(value: Any) -> float | None:
    """``value`` as a finite float; None for a bool (an int to Python, but True is no score of 1.0), a
    non-number, NaN, inf, or an int beyond the float range (JSON allows ``10**400``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def find_results_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[Path, bool]]:
    """``(file, explicit)`` for each given file and each ``results_*.json`` below each given directory (one path
    or several)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ScoresError("no lm-eval results files or directories given.")
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("results_*.json"))
            if not found:
                raise ScoresError(f"{p}: no results_*.json below this directory (lm-eval's --output_path).")
            out += [(f, False) for f in found]
        elif p.exists():  # anything but a regular file is refused when it is read
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
    checkpoint_stores: Sequence[tuple[str | os.PathLike, str]] | None = None,
) -> list[Score]:
    """Scores of ``task`` from lm-eval results files, each assigned to one of ``checkpoints``.

    Args:
        paths: results files and/or directories searched for ``results_*.json``. A file given
            explicitly must hold ``task``; files found in a directory without it (other tasks' runs)
            are skipped.
        checkpoints: ``[m]`` checkpoint names (e.g. ``LossTable.names``).
        checkpoint_paths: ``[m]`` each checkpoint's model path (``extra["path"]`` of a collected store),
            or None where unknown.
        mapping: recorded model (as lm-eval wrote it) -> checkpoint name; overrides the matching below.
        checkpoint_stores: ``[m]`` each checkpoint's loss store directory and its name within that store
            (``step-000001000`` for ``runA/losses/step-000001000`` of ``load_losses([...])``). A file whose
            recorded model is such a name belongs to the checkpoint whose store's parent directory (the run
            directory) holds the file: every run's results may then record the same ``step-...`` names.

    A recorded model is matched, in this order, to a checkpoint path, a checkpoint name, and a name within
    a store by location. Raises ScoresError for a missing task or metric, a model that matches no
    checkpoint (or, by location, several), or two files scoring one checkpoint.
    """
    matcher = _Matcher(checkpoints, checkpoint_paths, checkpoint_stores, mapping)
    seen: dict[str, Score] = {}
    skipped = []
    for file, explicit in find_results_files(paths):
        doc = _read_json(file)
        if not explicit and task not in _tasks(doc):
            skipped.append(file)
            continue
        value = read_score(doc, task, metric, filter, str(file))
        name = matcher.match(recorded_model(doc), file)
        if name in seen:
            raise ScoresError(
                f"checkpoint {name!r} is scored twice for {task!r}: {seen[name].source} and {file}; "
                "delete the stale results file or pass only one of them."
            )
        seen[name] = Score(name, value, str(file))
    if not seen:
        tasks = sorted({t for f in skipped for t in _tasks(_read_json(f))})
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
            value = math.nan
        if not math.isfinite(value):
            raise ScoresError(f"{path}, line {i}: {column}={row[column]!r} is not a finite number; give a score or "
                              "leave the checkpoint out.")
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
    if not path.exists():
        raise ScoresError(f"{path}: no such CSV file.")
    rows = []
    try:
        with io.StringIO(_read_text(path, "CSV"), newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise ScoresError(f"{path}: missing column(s) {missing}; the header is {reader.fieldnames}.")
            for row in reader:
                # DictReader files surplus fields under the key None and fills missing ones with None.
                if None in row or None in row.values():
                    raise ScoresError(f"{path}, line {reader.line_num}: {'more' if None in row else 'fewer'} fields "
                                      f"than the header {reader.fieldnames}; fix that line (quote a value that holds "
                                      "a comma).")
                rows.append(row)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ScoresError(f"{path} is not a UTF-8 CSV file ({e}); save it as UTF-8 text.") from None
    except OSError as e:
        raise ScoresError(f"{path}: cannot read this CSV file ({e.strerror or e}).") from None
    if not rows:
        raise ScoresError(f"{path}: no rows after the header.")
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(_read_text(path, "lm-eval results"))
    except ScoresError:
        raise
    except RecursionError:
        raise ScoresError(f"{path}: JSON nested too deeply to be an lm-eval results file; pass lm-eval's own "
                          "results_*.json files.") from None
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, not JSON, or an integer of over 4300 digits
        raise ScoresError(f"{path}: not a readable JSON file ({e}).") from e
    if not isinstance(doc, dict):
        raise ScoresError(f"{path}: not an lm-eval results file (top level is not an object).")
    return doc


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark, as Excel writes, dropped); ScoresError unless it
    is a regular file. Opened without blocking and checked on the open descriptor, so a FIFO (or a symlink to
    one) cannot hang the read, even if it replaces the file after a check by name."""
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ScoresError(f"{path} is not a regular file (a FIFO, socket or device); give the {what} file "
                              "itself.")
        return f.read().decode("utf-8-sig")


def _tasks(doc: Mapping[str, Any]) -> list[str]:
    """The task names of a results document; none if its 'results' is missing or malformed."""
    results = doc.get("results")
    return list(results) if isinstance(results, Mapping) else []


def _norm(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


class _Matcher:
    """Which checkpoint a results file belongs to (see :func:`scores_from_lmeval`)."""

    def __init__(
        self,
        checkpoints: Sequence[str],
        paths: Sequence[str | None] | None,
        stores: Sequence[tuple[str | os.PathLike, str]] | None,
        mapping: Mapping[str, str] | None,
    ) -> None:
        m = len(checkpoints)
        for arg, given in (("checkpoint_paths", paths), ("checkpoint_stores", stores)):
            if given is not None and len(given) != m:
                raise ValueError(f"{arg} has {len(given)} entries for {m} checkpoints; give one per checkpoint.")
        self.mapping = mapping
        self.names = set(checkpoints)
        self.by_path: dict[str, str] = {}
        for name, p in zip(checkpoints, paths or [None] * m):
            if p is None:
                continue
            if not isinstance(p, str):  # read from a loss file's metadata, which anyone can write
                raise ScoresError(f"checkpoint {name!r} records the model path {reprlib.repr(p)}, not a string; its "
                                  "loss file was not written by csv-callback: re-collect that checkpoint.")
            if p:
                self.by_path[_norm(p)] = name
        # name within its store -> [(run directory, checkpoint name)]
        self.by_local: dict[str, list[tuple[Path, str]]] = {}
        for name, (store, local) in zip(checkpoints, stores or []):
            self.by_local.setdefault(local, []).append((Path(store).resolve().parent, name))

    def match(self, model: str | None, file: Path) -> str:
        """The checkpoint ``file`` (recording ``model``) belongs to, or ScoresError saying how to tell."""
        if self.mapping is not None:
            if model in self.mapping:
                return self.mapping[model]
            raise ScoresError(f"{file}: model {model!r} is not in the mapping file; add a row '{model},<checkpoint>'.")
        if model is None:
            raise ScoresError(f"{file} records no model path; pass a mapping CSV (columns model,checkpoint).")
        if _norm(model) in self.by_path:
            return self.by_path[_norm(model)]
        if model in self.names:
            return model
        where = Path(file).resolve().parents
        near = [name for run, name in self.by_local.get(model, []) if run in where]
        if len(near) == 1:
            return near[0]
        if near:
            raise ScoresError(f"{file}: the model {model!r} could be checkpoint {near[0]!r} or {near[1]!r}, whose "
                              "loss stores share a run directory that holds this file; pass a mapping CSV with "
                              "columns model,checkpoint.")
        raise ScoresError(
            f"{file}: the model {model!r} matches no collected checkpoint (by path, by name, or by name in a loss "
            "store of the run directory holding this file); collect it first, or pass a mapping CSV with columns "
            "model,checkpoint."
        )
