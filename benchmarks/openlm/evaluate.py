"""Domain vectors on real LLMs: 104 open_lm models trained on three corpora, one corpus held out at a time.

Data: ``../shared/data/openlm-scaling/models.csv`` (its README): one row per model (11M-6.9B parameters, trained on
C4, RedPajama or RefinedWeb), its mean loss on 8 validation domains (``loss/<domain>``) and its scores on 46
in-context-learning tasks (``icl/<task>``, fractions in [0, 1]).

Per task, one domain vector: ``fit_salience(losses [104, 8], scores [104], groups=train_corpus,
domains=<the 8 names>, metric="acc")``. With three corpora as groups, each fold holds one corpus out, so the
vector's ``fit_report["cv_mse"]`` is the leave-one-corpus-out MSE of each method under the same folds: "csv"
(the domain weights and link, with the regularisation chosen on the other folds), "uniform" (the mean of the 8
losses through a fitted link: loss averaging, the paper's baseline) and "domain" (the single domain whose link
fits the fold's training corpora best, through that link). The geometric mean over tasks summarises them; the
target of issue 15 is csv's at most 0.5x loss averaging's and below the best single domain's.

    PYTHONPATH=. python benchmarks/openlm/evaluate.py --out benchmarks/openlm/data/evaluate.json \\
        --plot benchmarks/openlm/data/pred_vs_actual.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csv_callback import SalienceVector, fit_salience

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "openlm-scaling" / "models.csv"
# The ten tasks issue 15 names (among the suite's widest score spans), as the CSV names them without "icl/".
TASKS = ("hellaswag", "arc_easy", "piqa", "lambada_openai", "copa", "winograd", "openbook_qa",
         "bigbench_qa_wikidata", "arc_challenge", "boolq")
METHODS = ("csv", "uniform", "domain")
PLOT_TASKS = ("hellaswag", "arc_easy", "lambada_openai", "bigbench_qa_wikidata")


def load(path: str | Path = DEFAULT_DATA) -> dict[str, Any]:
    """``models.csv`` as arrays: ``domains`` (names without ``loss/``), ``losses`` ``[m, d]``, ``corpus`` ``[m]``
    (str), ``models`` ``[m]`` and ``scores``: task name (without ``icl/``) -> ``[m]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no open_lm scaling data; pass --data <path to models.csv> (the file is "
                                "../shared/data/openlm-scaling/models.csv beside the clone).")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows; expected one row per model.")
    header = list(rows[0])
    loss_cols = [c for c in header if c.startswith("loss/")]
    score_cols = [c for c in header if c.startswith("icl/")]
    missing = [c for c in ("model", "train_corpus") if c not in header]
    if missing or not loss_cols or not score_cols:
        raise ValueError(f"{path} lacks the columns {missing or 'loss/<domain> or icl/<task>'}; expected the "
                         "open_lm scaling suite's models.csv (see its README).")
    return {
        "domains": [c.removeprefix("loss/") for c in loss_cols],
        "losses": np.array([[float(r[c]) for c in loss_cols] for r in rows]),
        "corpus": [r["train_corpus"] for r in rows],
        "models": [r["model"] for r in rows],
        "scores": {c.removeprefix("icl/"): np.array([float(r[c]) for r in rows]) for c in score_cols},
    }


def fit_task(data: dict[str, Any], task: str) -> SalienceVector:
    """The domain vector of ``task``, cross-validated over the training corpora (one held out per fold)."""
    if task not in data["scores"]:
        raise ValueError(f"unknown task {task!r}; the data has {sorted(data['scores'])}.")
    return fit_salience(data["losses"], data["scores"][task], groups=data["corpus"], domains=data["domains"],
                        task=task, metric="acc")


def task_row(vector: SalienceVector) -> dict[str, Any]:
    """What the benchmark keeps of one task's vector: held-out MSE and MAE per method, the chosen strength, the
    single domain that fits all models best and the final weights by domain."""
    report = vector.fit_report
    y = np.asarray(report["scores"])
    return {
        "task": vector.task,
        "n": report["n_checkpoints"],
        "score_span": float(y.max() - y.min()),
        "cv_mse": {k: report["cv_mse"][k] for k in METHODS},
        "cv_mae": {k: report["cv_mae"][k] for k in METHODS},
        "csv_over_uniform": report["cv_mse"]["csv"] / report["cv_mse"]["uniform"],
        "csv_over_domain": report["cv_mse"]["csv"] / report["cv_mse"]["domain"],
        "lam": report["lam"],
        "best_domain": report["best_domain"],
        "weights": dict(zip(vector.domains, (float(w) for w in vector.weights))),
    }


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Geometric means over the tasks of each method's held-out MSE, their ratios, and the verdict vs the target."""
    geo = {k: math.exp(float(np.mean([math.log(r["cv_mse"][k]) for r in rows]))) for k in METHODS}
    ratio_uniform, ratio_domain = geo["csv"] / geo["uniform"], geo["csv"] / geo["domain"]
    return {
        "tasks": [r["task"] for r in rows],
        "geo_mean_mse": geo,
        "csv_over_uniform": ratio_uniform,
        "csv_over_domain": ratio_domain,
        "target_met": bool(ratio_uniform <= 0.5 and ratio_domain < 1.0),
    }


def evaluate(data: dict[str, Any], tasks: Sequence[str] = TASKS) -> tuple[list[SalienceVector], dict[str, Any]]:
    """The vectors of ``tasks`` and the result: ``{"data": ..., "rows": [task_row per task], "summary": ...}``."""
    vectors = [fit_task(data, t) for t in tasks]
    rows = [task_row(v) for v in vectors]
    counts = {c: data["corpus"].count(c) for c in sorted(set(data["corpus"]))}
    result = {"data": {"models": len(data["models"]), "corpora": counts, "domains": data["domains"]},
              "rows": rows, "summary": summary(rows)}
    return vectors, result


def table(result: dict[str, Any]) -> str:
    """The Markdown table of BENCHMARKS.md: held-out MSE per task and method, and the geometric means."""
    lines = ["| task | score span | csv | loss averaging | best single domain | csv / loss avg | csv / best domain |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        m = r["cv_mse"]
        lines.append(f"| {r['task']} | {r['score_span']:.3f} | {m['csv']:.2e} | {m['uniform']:.2e} | "
                     f"{m['domain']:.2e} | {r['csv_over_uniform']:.2f} | {r['csv_over_domain']:.2f} |")
    s = result["summary"]
    g = s["geo_mean_mse"]
    lines.append(f"| **geometric mean** | | **{g['csv']:.2e}** | {g['uniform']:.2e} | {g['domain']:.2e} | "
                 f"**{s['csv_over_uniform']:.2f}** | **{s['csv_over_domain']:.2f}** |")
    return "\n".join(lines)


def plot(vectors: Sequence[SalienceVector], path: str | Path, tasks: Sequence[str] = PLOT_TASKS) -> None:
    """Held-out predicted vs actual score, one colour per training corpus: csv on top, loss averaging below, one
    column per task of ``tasks`` (each must be among ``vectors``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task = {v.task: v for v in vectors}
    missing = [t for t in tasks if t not in by_task]
    if missing:
        raise ValueError(f"no vector for the plotted tasks {missing}; evaluate them first (have {sorted(by_task)}).")
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 6.4), squeeze=False)
    for col, task in enumerate(tasks):
        report = by_task[task].fit_report
        y, corpus = np.asarray(report["scores"]), np.asarray(report["groups"])
        shown = np.concatenate([y, report["cv_pred"]["csv"], report["cv_pred"]["uniform"]])
        lo, hi = float(shown.min()) - 0.02, float(shown.max()) + 0.02
        for row, (method, label) in enumerate((("csv", "csv (domain weights)"), ("uniform", "loss averaging"))):
            ax = axes[row, col]
            pred = np.asarray(report["cv_pred"][method])
            for c in sorted(set(corpus)):
                ax.scatter(y[corpus == c], pred[corpus == c], s=12, alpha=0.75, label=c)
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
            ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="actual score",
                   title=f"{task}\n{label}: MSE {report['cv_mse'][method]:.1e}")
            if col == 0:
                ax.set_ylabel("predicted, corpus held out")
    axes[0, 0].legend(title="training corpus", fontsize=7, title_fontsize=7)
    fig.suptitle("open_lm, 104 models: leave-one-training-corpus-out predictions from 8 domain losses")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the suite's models.csv")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="task names without 'icl/'")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--plot", type=Path, help="write the predicted-vs-actual figure (PNG) here")
    args = parser.parse_args(argv)
    if args.plot is not None:
        absent = [t for t in PLOT_TASKS if t not in args.tasks]
        if absent:
            parser.error(f"--plot draws {list(PLOT_TASKS)}; add {absent} to --tasks or leave out --plot.")
    vectors, result = evaluate(load(args.data), args.tasks)
    print(table(result))
    s = result["summary"]
    print(f"\ngeometric mean over {len(s['tasks'])} tasks: csv / loss averaging {s['csv_over_uniform']:.3f}, "
          f"csv / best single domain {s['csv_over_domain']:.3f}; target (<= 0.5 and < 1) "
          f"{'met' if s['target_met'] else 'missed'}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(vectors, args.plot)


if __name__ == "__main__":
    main()
