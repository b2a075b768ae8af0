"""The two-step task scaling law on AI2's OLMo ladder: OLMo 2 7B and 13B predicted from (N, D) alone.

AI2's ladder (Bhagia et al., arXiv:2412.04403) predicts a target model's accuracy in two steps; this benchmark runs
both with this project's code (``csv_callback.scaling``) and compares with the paper's published numbers:

- **step 1** (:func:`csv_callback.scaling.fit_scaling_law`): ``L(N, D)``, one point per ladder run (the 16 runs of
  ``configs/final.json`` with mode ``train``): N = the config's ``n``, D = the tokens of the run's last row, the
  loss = the mean over its last 5 rows; Huber delta 1e-3. Predicted at the targets: 13B-5T (D = its last row's
  ``_step x batch_size_in_tokens``, the file records no total; actual = the mean of its last 5 rows) and 7B-4T
  (its one annealed row). Task bpb as the data's README defines it (MMLU: the weighted mean of its 4 subsets).
  Compared with ``published/step1_main.csv`` (13B).
- **chained**: step 2's sigmoid (``olmo_link.fit_task``: the 1401 smoothed ladder points, the (0, 1) anchor, the
  paper's start) evaluated at step 1's predicted bpb; compared with ``published/chained_main.csv`` (13B; its
  "Rel Error" is |pred - actual| / actual).
- **domain chains**: the same two steps with the 11 validation-domain losses as the intermediate feature
  (``olmo_domains.py``): ``csv``, the domain vector's weighted loss (step 2 = the vector's link), and
  ``uniform``, loss averaging (the mean of the 11 losses, its link). Step 1 is fitted to the 16 runs' features
  (each run's last-5-row mean domain losses, weighted).

Every chain also gives :func:`csv_callback.scaling.predict_score`'s 80% interval: the law's (parameter covariance
plus residual spread) and the link's (split-conformal on held-out residuals, leave one model size out: the fit's own
for ``csv`` and ``uniform``, the same folds refitted here for the task-bpb link) in quadrature. The headline is the
mean absolute error in accuracy points over the paper's 8 main tasks, per target.

    PYTHONPATH=. python benchmarks/olmo_scaling.py [--data ../shared/data/olmo-ladder]
                                                   [--out benchmarks/results/olmo_scaling.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import olmo_domains as od
import olmo_link

from csv_callback import SalienceVector
from csv_callback.fit import fit_link
from csv_callback.salience import INTERVAL_KEY, INTERVAL_METHOD
from csv_callback.scaling import ScalingLaw, fit_scaling_law, predict_score

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = od.DEFAULT_DATA
DEFAULT_OUT = REPO / "benchmarks" / "results" / "olmo_scaling.json"
TARGETS = olmo_link.TARGETS
CHAINS = ("bpb", "csv", "uniform")
LEVEL = 0.8
LAST_ROWS = 5  # AI2's --moving_avg 5: a run's (and the 13B target's) loss is the mean over its last 5 rows
DELTA = 1e-3


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows; is this a ladder-runs CSV of the OLMo ladder data?")
    return rows


def tokens_seen(row: dict[str, str]) -> float:
    """D of one evaluated checkpoint: ``throughput/total_tokens``, or, where a file does not record it (the 13B's),
    ``_step x batch_size_in_tokens`` (the ladder runs' rows satisfy both)."""
    if row.get("throughput/total_tokens"):
        return float(row["throughput/total_tokens"])
    return float(row["_step"]) * float(row["batch_size_in_tokens"])


def load(data_dir: str | Path = DEFAULT_DATA) -> dict[str, Any]:
    """The 16 ladder runs and the 2 targets as step 1 sees them, beside ``olmo_domains.load``'s step-2 data.

    Returns olmo_domains.load's dict plus ``"runs1"``: ``[{"run", "size", "n", "tokens", "last": [<=5] rows}]``
    for the 16 runs (configs/final.json order), ``"targets1"``: ``{target: the same}`` and ``"published1"``:
    ``{"step1"|"chained": {task: {"Actual", "Pred", "Rel Error"[, "Fit Error"]}}}`` (13B-5T).
    """
    data_dir = Path(data_dir)
    data = od.load(data_dir)
    config = json.loads((data_dir / "configs" / "final.json").read_text())
    runs, targets = [], {}
    for size, c in config.items():
        for path in c["paths"]:
            name = Path(path).name
            rows = _rows(data_dir / "ladder-runs" / name)
            run = {"run": name.removesuffix(".csv"), "size": size, "n": float(c["n"]),
                   "tokens": tokens_seen(rows[-1]), "last": rows[-LAST_ROWS:]}
            if c["mode"] == "train":
                runs.append(run)
            else:
                targets[size] = run
    if len(runs) != 16 or set(targets) != set(TARGETS):
        raise ValueError(f"{data_dir / 'configs' / 'final.json'}: expected 16 ladder runs and the targets {TARGETS}, "
                         f"got {len(runs)} runs and {sorted(targets)}.")
    paper_keys = {task["paper_task_key"]: key for key, task in data["tasks"].items()}
    published = {}
    for what in ("step1", "chained"):
        with (data_dir / "published" / f"{what}_main.csv").open(newline="") as f:
            published[what] = {paper_keys[r["Task"]]: {k: float(v) for k, v in r.items() if k != "Task"}
                               for r in csv.DictReader(f)}
    return {**data, "runs1": runs, "targets1": targets, "published1": published}


def task_bpb(run: dict[str, Any], task: dict[str, Any]) -> float:
    """A run's task bpb: the weighted mean of the task's columns (MMLU's 4 subsets), averaged over its last rows."""
    w = np.asarray(task["column_weights"], dtype=np.float64)
    return float(np.mean([w @ [float(r[c]) for c in task["bpb_columns"]] for r in run["last"]]))


def domain_losses(run: dict[str, Any]) -> np.ndarray:
    """``[11]``: a run's validation-domain losses (``od.DOMAINS`` order), averaged over its last rows."""
    return np.mean([[float(r[od.column(d)]) for d in od.DOMAINS] for r in run["last"]], axis=0)


def bpb_vector(key: str, task: dict[str, Any], sizes: list[str]) -> SalienceVector:
    """Step 2 from task bpb (``olmo_link.fit_task``) as a one-feature vector, with held-out residuals for its
    interval from the folds fit_salience uses with groups = model size (leave one size out)."""
    link, points = olmo_link.fit_task(task)
    bpb, acc = points[:, 0], points[:, 1]
    sizes_arr = np.asarray(sizes)
    held_out = np.empty(len(acc))
    for size in dict.fromkeys(sizes):
        out = sizes_arr == size
        chance = float(task["chance_acc"])
        fold = fit_link(bpb[~out], acc[~out], metric="acc", anchor=tuple(task["ideal_point"]),
                        start=(chance, 1.0, 3.0, 0.9))
        held_out[out] = fold(bpb[out])
    return SalienceVector(np.ones(1), link, task=key, metric="acc", domains=("task_bpb",),
                          loss_range=(float(bpb.min()), float(bpb.max())),
                          fit_report={INTERVAL_KEY: _interval(held_out, acc)})


def uniform_vector(key: str, vector: SalienceVector, link: Any, X: np.ndarray) -> SalienceVector:
    """Loss averaging as a domain vector: equal weights, ``link`` (fitted to the mean losses ``X.mean(1)``), and the
    held-out residuals of loss averaging from ``vector``'s own cross-validation (same folds)."""
    y = np.asarray(vector.fit_report["scores"])
    mean = X.mean(axis=1)
    return SalienceVector(np.full(len(od.DOMAINS), 1 / len(od.DOMAINS)), link, task=key, metric="acc",
                          domains=od.DOMAINS, loss_range=(float(mean.min()), float(mean.max())),
                          fit_report={INTERVAL_KEY: _interval(np.asarray(vector.fit_report["cv_pred"]["uniform"]), y)})


def _interval(held_out: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    return {"method": INTERVAL_METHOD, "abs_residuals": np.sort(np.abs(held_out - y)).tolist()}


def _law_summary(law: ScalingLaw, N: np.ndarray, D: np.ndarray, L: np.ndarray) -> dict[str, Any]:
    """The law's parameters and its fitting error (mean |L(N, D) - L| / L over the runs, AI2's "Fit Error")."""
    return {"E": law.E, "A": law.A, "alpha": law.alpha, "B": law.B, "beta": law.beta,
            "log_residual_std": law.log_residual_std,
            "fit_rel_err": float(np.mean(np.abs(law.predict(N, D) - L) / L))}


def evaluate(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: step 1 (task bpb) and each chain's prediction, interval and errors per target."""
    runs, targets = data["runs1"], data["targets1"]
    N = np.array([r["n"] for r in runs])
    D = np.array([r["tokens"] for r in runs])
    run_domains = np.stack([domain_losses(r) for r in runs])  # [16, 11]
    rows = []
    for key, task in data["tasks"].items():
        y = np.asarray([p[4] for p in task["ladder_points"]], dtype=np.float64)
        fitted = od.fit_task(data["X"], y, data["sizes"], key)
        vectors = {"bpb": bpb_vector(key, task, data["sizes"]), "csv": fitted["csv"],
                   "uniform": uniform_vector(key, fitted["csv"], fitted["uniform"], data["X"])}
        features = {"bpb": (np.array([task_bpb(r, task) for r in runs]),
                            {t: task_bpb(targets[t], task) for t in TARGETS})}
        for m in ("csv", "uniform"):
            features[m] = (vectors[m].weighted_loss(run_domains),
                           {t: float(vectors[m].weighted_loss(domain_losses(targets[t]))) for t in TARGETS})
        row: dict[str, Any] = {"task": key, "main_set": bool(task["in_paper_main_set"]), "law": {}, "link": {},
                               **{t: {"actual": float(task["targets"][t][1]), "step1": {}, "chain": {}}
                                  for t in TARGETS}}
        for m, (L, at_target) in features.items():
            law = fit_scaling_law(N, D, L, delta=DELTA)
            row["law"][m] = _law_summary(law, N, D, L)
            link = vectors[m].link
            row["link"][m] = [link.lo, link.hi, link.k, link.L0]
            for t in TARGETS:
                n_t, d_t, actual = targets[t]["n"], targets[t]["tokens"], row[t]["actual"]
                loss, (lo, hi) = float(law.predict(n_t, d_t)), law.interval(n_t, d_t, LEVEL)
                row[t]["step1"][m] = {"N": n_t, "D": d_t, "actual": at_target[t], "pred": loss,
                                      "rel_err": (loss - at_target[t]) / at_target[t], "interval": [lo, hi],
                                      "covers": bool(lo <= at_target[t] <= hi)}
                pred, lo, hi = predict_score(law, vectors[m], n_t, d_t, LEVEL)
                row[t]["chain"][m] = {"pred": pred, "abs_err": abs(pred - actual), "rel_err": (pred - actual) / actual,
                                      "interval": [lo, hi], "covers": bool(lo <= actual <= hi)}
        published = {w: data["published1"][w].get(key) for w in ("step1", "chained")}
        row["published_13B"] = {w: p for w, p in published.items() if p is not None}
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per target and chain over the paper's 8 main tasks: mean absolute error (points), mean |rel|, interval
    coverage; the published chain's mean (13B)."""
    main = [r for r in rows if r["main_set"]]
    out: dict[str, Any] = {}
    for t in TARGETS:
        out[t] = {m: {"mean_abs_err_points": 100 * float(np.mean([r[t]["chain"][m]["abs_err"] for r in main])),
                      "mean_abs_rel_err": float(np.mean([abs(r[t]["chain"][m]["rel_err"]) for r in main])),
                      "covered": sum(r[t]["chain"][m]["covers"] for r in main), "of": len(main),
                      "step1_mean_abs_rel_err": float(np.mean([abs(r[t]["step1"][m]["rel_err"]) for r in main]))}
                  for m in CHAINS}
    pub = [r["published_13B"]["chained"] for r in main]
    out["13B-5T"]["published_bpb"] = {
        "mean_abs_err_points": 100 * float(np.mean([abs(p["Pred"] - p["Actual"]) for p in pub])),
        "mean_abs_rel_err": float(np.mean([p["Rel Error"] for p in pub]))}
    return out


def markdown(rows: list[dict[str, Any]], means: dict[str, Any]) -> str:
    """Three tables: step 1 and the chain from task bpb (13B) beside AI2's; every chain's error per target."""
    lines = ["Step 1, task bpb of the 13B-5T from (N, D): ours beside `published/step1_main.csv`.", "",
             "| task | actual | pred | published pred | rel err | published rel err | fit err | published fit |",
             "| --- |" + " ---: |" * 7]
    for r in rows:
        d, p = r["13B-5T"]["step1"]["bpb"], r["published_13B"].get("step1")
        pub = (f"{p['Pred']:.4f}", f"{100 * p['Rel Error']:+.2f}%", f"{100 * p['Fit Error']:.2f}%") if p else "---"
        lines.append(f"| {r['task']}{'' if r['main_set'] else '*'} | {d['actual']:.4f} | {d['pred']:.4f} | {pub[0]} | "
                     f"{100 * d['rel_err']:+.2f}% | {pub[1]} | {100 * r['law']['bpb']['fit_rel_err']:.2f}% | "
                     f"{pub[2]} |")
    lines += ["", "Chained, accuracy of the 13B-5T from (N, D) through task bpb: ours beside "
              "`published/chained_main.csv` (points).", "",
              "| task | actual | pred | published pred | abs err | published abs err | 80% interval | covers |",
              "| --- |" + " ---: |" * 7]
    for r in rows:
        d, p = r["13B-5T"]["chain"]["bpb"], r["published_13B"].get("chained")
        lo, hi = d["interval"]
        pub = (f"{100 * p['Pred']:.2f}", f"{100 * abs(p['Pred'] - p['Actual']):.2f}") if p else "--"
        lines.append(f"| {r['task']}{'' if r['main_set'] else '*'} | {100 * r['13B-5T']['actual']:.2f} | "
                     f"{100 * d['pred']:.2f} | {pub[0]} | {100 * d['abs_err']:.2f} | {pub[1]} | "
                     f"[{100 * lo:.1f}, {100 * hi:.1f}] | {'yes' if d['covers'] else 'no'} |")
    lines += ["", "Every chain, absolute error in points (80% interval covers: y/n): bpb = task bpb (AI2's chain), "
              "csv = domain vector, uniform = mean of the 11 domain losses.", "",
              "| task | " + " | ".join(f"{t.split('-')[0]} {m}" for t in TARGETS for m in CHAINS) + " |",
              "| --- |" + " ---: |" * (len(TARGETS) * len(CHAINS))]
    for r in rows:
        cells = [f"{100 * r[t]['chain'][m]['abs_err']:.2f} {'y' if r[t]['chain'][m]['covers'] else 'n'}"
                 for t in TARGETS for m in CHAINS]
        lines.append(f"| {r['task']}{'' if r['main_set'] else '*'} | " + " | ".join(cells) + " |")
    cells = [f"**{means[t][m]['mean_abs_err_points']:.2f}** ({means[t][m]['covered']}/{means[t][m]['of']})"
             for t in TARGETS for m in CHAINS]
    lines.append("| **mean, 8 main** | " + " | ".join(cells) + " |")
    lines += ["", f"\\* Not in the paper's 8-task main set (not in the means). Published chain from task bpb, 13B: "
              f"{means['13B-5T']['published_bpb']['mean_abs_err_points']:.2f} points."]
    lines += ["", "Step 1 alone per intermediate feature: (pred - actual) / actual of the target's feature (80% "
              "interval covers: y/n).", "",
              "| task | " + " | ".join(f"{t.split('-')[0]} {m}" for t in TARGETS for m in CHAINS) + " |",
              "| --- |" + " ---: |" * (len(TARGETS) * len(CHAINS))]
    for r in rows:
        cells = [f"{100 * r[t]['step1'][m]['rel_err']:+.2f}% {'y' if r[t]['step1'][m]['covers'] else 'n'}"
                 for t in TARGETS for m in CHAINS]
        lines.append(f"| {r['task']}{'' if r['main_set'] else '*'} | " + " | ".join(cells) + " |")
    cells = [f"**{100 * means[t][m]['step1_mean_abs_rel_err']:.2f}%**" for t in TARGETS for m in CHAINS]
    lines.append("| **mean abs, 8 main** | " + " | ".join(cells) + " |")
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
    args.out.write_text(json.dumps({"level": LEVEL, "delta": DELTA, "chains": list(CHAINS), "summary": means,
                                    "tasks": rows}, indent=1) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
