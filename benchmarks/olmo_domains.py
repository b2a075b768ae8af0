"""Domain vectors on real LLMs: OLMo 2 7B and 13B accuracies predicted from their 11 validation-domain losses.

The domain analogue of step 2 of AI2's OLMo ladder (Bhagia et al., arXiv:2412.04403; ``olmo_link.py`` fits the
step itself). The input feature is the 11 validation-domain cross-entropy losses every ladder checkpoint logs
(``eval/<domain>-validation/CrossEntropyLoss`` in ``ladder-runs/*.csv``) instead of the task's bits-per-byte;
everything else is step 2's: the same 16 runs (190M/370M/760M/1.3B x 1/2/5/10xC), the first ``ceil(0.1 n)``
checkpoints of each run dropped, the trailing mean over up to 5 kept checkpoints (losses and accuracy alike),
the (loss 0, accuracy 1) anchor point, and the targets' final values as the data's README defines them (the 7B's
one annealed row; the 13B's mean of its last 5 rows). Accuracies and targets are read from ``step2.json``, so they
are exactly the points step 2 fits.

Per task, four predictors are fitted on the 1401 ladder points and applied to the targets' domain losses:

- ``csv``: :func:`csv_callback.fit_salience` over the 11 domains (weights on the simplex, sigmoid link), its
  regularisation chosen by cross-validation with groups = model size (leave one size out: the four runs of one
  size share a model and the early part of their trajectories, and the targets are a size the fit has not seen);
- ``uniform``: loss averaging, the mean of the 11 losses through a link (``fit_link``, same anchor);
- ``domain``: the best single domain: the vector's ``best_domain``, the domain whose link fits all ladder points
  best (in its cross-validated report each fold chooses on its own training rows);
- ``c4``: the ``c4_en`` domain alone, our reproduction of AI2's step 2 from C4 loss (``published/step2_c4_main.csv``).

Errors are as the README reports them: absolute error in points and (pred - actual) / actual, per target; the
headline is the mean absolute error over the paper's 8 main tasks, beside AI2's published step-2 errors from task
bpb (2.37 / 2.40 points) and from C4 loss (13B only; the repository publishes no 7B number for it).

    PYTHONPATH=. python benchmarks/olmo_domains.py [--data ../shared/data/olmo-ladder]
                                                   [--out benchmarks/results/olmo_domains.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from olmo_link import TARGETS, reference_pred

from csv_callback import fit_salience
from csv_callback.fit import fit_link

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "olmo-ladder"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "olmo_domains.json"
DOMAINS = ("c4_en", "dolma_books", "dolma_common-crawl", "dolma_pes2o", "dolma_reddit", "dolma_stack", "dolma_wiki",
           "ice", "m2d2_s2orc", "pile", "wikitext_103")
METHODS = ("csv", "uniform", "domain", "c4")
ANCHOR = (0.0, 1.0)
# AI2's published 13B-5T step-2 predictions, by this module's task keys.
PUBLISHED = {"bpb": "step2_main.csv", "c4": "step2_c4_main.csv"}


def column(domain: str) -> str:
    return f"eval/{domain}-validation/CrossEntropyLoss"


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """``values`` ``[n, ...]`` replaced row by row by the mean of that row and up to ``window - 1`` rows before it."""
    csum = np.cumsum(np.concatenate([np.zeros_like(values[:1]), values]), axis=0)
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(hi - window, 0)
    return (csum[hi] - csum[lo]) / (hi - lo).reshape(-1, *([1] * (values.ndim - 1)))


def _read_losses(path: Path) -> tuple[list[int | None], np.ndarray]:
    """A ladder-runs CSV's steps (None where the file has no ``_step``) and domain losses ``[rows, 11]``."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [column(d) for d in DOMAINS if column(d) not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no columns {missing}; is this a ladder-runs CSV of the OLMo ladder data?")
    steps = [int(float(r["_step"])) if "_step" in r else None for r in rows]
    return steps, np.array([[float(r[column(d)]) for d in DOMAINS] for r in rows], dtype=np.float64)


def step2_points(values: Any, step2: dict[str, Any]) -> np.ndarray:
    """``values`` ``[1566, ...]``, one row per ladder checkpoint in ``step2["checkpoints"]``'s order, turned into the
    ``[1401, ...]`` fitted points by step 2's rule: per run, drop the first ``ceil(0.1 n)`` checkpoints (step2.json's
    ``kept_for_fit``), then the trailing mean over up to 5 kept checkpoints."""
    prep = step2["preprocessing"]
    values = np.asarray(values, dtype=np.float64)
    checkpoints = step2["checkpoints"]
    if len(values) != len(checkpoints):
        raise ValueError(f"values has {len(values)} rows but step2.json has {len(checkpoints)} ladder checkpoints; "
                         "pass one row per checkpoint, in its order.")
    runs = [(c[0], c[1]) for c in checkpoints]
    points = []
    for run in dict.fromkeys(runs):
        at = np.flatnonzero([r == run for r in runs])
        kept = np.array([checkpoints[i][4] for i in at])
        if (kept != (np.arange(len(at)) >= math.ceil(prep["skip_first_fraction"] * len(at)))).any():
            raise ValueError(f"run {run}: step2.json's kept_for_fit is not 'all but the first 10%' of its checkpoints.")
        points.append(trailing_mean(values[at[kept]], int(prep["moving_average_window"])))
    return np.concatenate(points)


def load(data_dir: str | Path = DEFAULT_DATA) -> dict[str, Any]:
    """The ladder points and targets, with domain losses.

    Returns ``{"X": [1401, 11] smoothed ladder domain losses, "sizes": [1401] model size per point,
    "runs": [1401] run ("190M-1xC", ...), "targets": {target: [11] losses}, "step2": step2.json,
    "tasks": its tasks, "published": {"bpb"|"c4": {task: 13B predicted accuracy}}}``.
    """
    data_dir = Path(data_dir)
    step2_path = data_dir / "step2.json"
    if not step2_path.is_file():
        raise FileNotFoundError(f"{step2_path}: no OLMo ladder data; pass --data <the olmo-ladder directory>.")
    step2 = json.loads(step2_path.read_text())
    prep = step2["preprocessing"]
    window = int(prep["moving_average_window"])
    checkpoints = step2["checkpoints"]
    raw = []
    for name in prep["ladder_files"]:
        steps, losses = _read_losses(data_dir / "ladder-runs" / name)
        if [c[2] for c in checkpoints[len(raw):len(raw) + len(steps)]] != steps:
            raise ValueError(f"{name}: its steps differ from step2.json's checkpoints; the two files are not one "
                             "snapshot of the data.")
        raw += list(losses)
    X = step2_points(raw, step2)
    kept = [c for c in checkpoints if c[4]]
    sizes = [c[0] for c in kept]
    runs = [f"{c[0]}-{c[1]}" for c in kept]
    tasks = step2["tasks"]
    for key, task in tasks.items():
        if [p[:3] for p in task["ladder_points"]] != [c[:3] for c in kept]:
            raise ValueError(f"task {key}: step2.json's ladder points do not line up with the kept checkpoints.")
    targets = {}
    for target, name in prep["target_files"].items():
        _, losses = _read_losses(data_dir / "ladder-runs" / name)
        # README: the 7B is its file's single row; the 13B the mean of its last 5 rows (step 2's window, last value).
        targets[target] = trailing_mean(losses, window)[-1]
    published = {}
    paper_keys = {task["paper_task_key"]: key for key, task in tasks.items()}
    for what, name in PUBLISHED.items():
        with (data_dir / "published" / name).open(newline="") as f:
            published[what] = {paper_keys[r["Task"]]: float(r["Pred"]) for r in csv.DictReader(f)}
    return {"X": X, "sizes": sizes, "runs": runs, "targets": targets, "step2": step2, "tasks": tasks,
            "published": published}


def fit_task(X: np.ndarray, y: np.ndarray, sizes: list[str], task: str) -> dict[str, Any]:
    """The four predictors fitted on one task's ladder points ``X`` ``[m, 11]``, ``y`` ``[m]``: the domain vector
    (``"csv"``) and the links of ``"uniform"`` (mean loss), ``"domain"`` (the vector's ``best_domain``, the column
    whose link fits all ladder points best) and ``"c4"``."""
    vector = fit_salience(X, y, groups=sizes, domains=list(DOMAINS), task=task, metric="acc", anchor=ANCHOR)
    best = DOMAINS.index(vector.fit_report["best_domain"])
    c4 = DOMAINS.index("c4_en")
    return {
        "csv": vector,
        "uniform": fit_link(X.mean(axis=1), y, metric="acc", anchor=ANCHOR),
        "domain": fit_link(X[:, best], y, metric="acc", anchor=ANCHOR),
        "c4": fit_link(X[:, c4], y, metric="acc", anchor=ANCHOR),
    }


def _feature(method: str, fitted: dict[str, Any], losses: np.ndarray) -> float:
    if method == "uniform":
        return float(losses.mean())
    if method == "domain":
        return float(losses[DOMAINS.index(fitted["csv"].fit_report["best_domain"])])
    return float(losses[DOMAINS.index("c4_en")])


def evaluate(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: each method's prediction and errors per target, the published step-2 errors, the csv
    weights and cross-validated ladder MSEs."""
    rows = []
    for key, task in data["tasks"].items():
        y = np.asarray([p[4] for p in task["ladder_points"]], dtype=np.float64)
        fitted = fit_task(data["X"], y, data["sizes"], key)
        vector = fitted["csv"]
        row: dict[str, Any] = {
            "task": key, "n": len(y), "main_set": bool(task["in_paper_main_set"]),
            "csv_weights": dict(zip(DOMAINS, vector.weights.tolist())),
            "csv_lam": vector.fit_report["lam"],
            "best_domain": vector.fit_report["best_domain"],
            "ladder_cv_mse": {m: vector.fit_report["cv_mse"][m] for m in ("csv", "uniform", "domain")},
        }
        step2_pred = reference_pred(key, task)
        for target in TARGETS:
            actual = float(task["targets"][target][1])
            losses = data["targets"][target]
            preds = {"csv": float(vector.predict(vector.domain_losses(dict(zip(DOMAINS, losses)))))}
            preds.update({m: float(fitted[m](_feature(m, fitted, losses))) for m in ("uniform", "domain", "c4")})
            published = {"bpb": step2_pred[target]}
            if target == "13B-5T" and key in data["published"]["c4"]:
                published["c4"] = data["published"]["c4"][key]
            row[target] = {
                "actual": actual,
                "losses": dict(zip(DOMAINS, losses.tolist())),
                "pred": preds,
                "abs_err": {m: abs(p - actual) for m, p in preds.items()},
                "rel_err": {m: (p - actual) / actual for m, p in preds.items()},
                "published_pred": published,
                "published_abs_err": {m: abs(p - actual) for m, p in published.items()},
            }
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean absolute error in points over the paper's 8 main tasks, per target and method (ours and published)."""
    main = [r for r in rows if r["main_set"]]
    out = {}
    for target in TARGETS:
        means = {m: 100 * float(np.mean([r[target]["abs_err"][m] for r in main])) for m in METHODS}
        for m in main[0][target]["published_abs_err"]:
            means[f"published_{m}"] = 100 * float(np.mean([r[target]["published_abs_err"][m] for r in main]))
        out[target] = means
    return out


def markdown(rows: list[dict[str, Any]], means: dict[str, dict[str, float]]) -> str:
    """Absolute error in points per task and target: ours (csv, uniform, best domain, c4) beside AI2's."""
    cols = {t: list(means[t]) for t in TARGETS}  # the 7B has no published number from C4 loss
    head = ("| task | best domain | " + " | ".join(f"{t.split('-')[0]} {c}" for t in TARGETS for c in cols[t])
            + " |\n| --- | --- |" + " ---: |" * sum(map(len, cols.values())))
    lines = [head]
    for r in rows:
        cells = [f"{r['task']}{'' if r['main_set'] else '*'}", r["best_domain"]]
        for t in TARGETS:
            errs = {**r[t]["abs_err"], **{f"published_{k}": v for k, v in r[t]["published_abs_err"].items()}}
            cells += [f"{100 * errs[c]:.2f}" if c in errs else "-" for c in cols[t]]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**mean, 8 main**", ""]
    for t in TARGETS:
        cells += [f"**{means[t][c]:.2f}**" for c in cols[t]]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("\n\\* Not in the paper's 8-task main set (not in the means). Absolute error |pred - actual| in "
                 "accuracy points; published_bpb = AI2's step 2 from task bpb, published_c4 = from C4 loss (13B only).")
    lines += ["", "Ladder cross-validated MSE (leave one size out; the fit's own report):", "",
              "| task | csv | uniform | domain |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['task']} | " + " | ".join(f"{r['ladder_cv_mse'][m]:.2e}" for m in ("csv", "uniform", "domain"))
              + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the olmo-ladder directory")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    rows = evaluate(load(args.data))
    means = summary(rows)
    print(markdown(rows, means))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"groups": "model size (leave one size out)", "anchor": list(ANCHOR),
                                    "domains": list(DOMAINS), "mean_abs_err_points_main8": means, "tasks": rows},
                                   indent=1) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
