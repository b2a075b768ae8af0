"""The downstream scaling law on the ladder: the largest size's final scores from the smaller sizes' runs alone.

Protocol (b) of ``evaluate.py`` fits each task's vector on every size but the largest and feeds it the largest
size's *true* losses: it needs the large model trained. Here the large model is not needed. Per task and data
mixture:

1. the weighted losses (protocol (b)'s vector) of the smaller sizes' runs of that mixture, every checkpoint,
   are fitted with :func:`~csv_callback.scaling.fit_scaling_law`: ``L(N, D)`` with N the model's parameter count
   (built from ``train.SIZES``, embeddings included, tied once: what the callbacks record) and D the tokens seen
   at the checkpoint (as the stores record it);
2. the law's weighted loss at the largest size's (N, D) of its final checkpoint goes through the vector's link
   (:func:`~csv_callback.scaling.predict_score`), with the 80% interval of both steps.

The same chain with the mean probe loss ("loss averaging": its law per mixture, its link fitted on the smaller
sizes' checkpoints as protocol (b)'s baseline is) is the baseline. Reported: MSE over the (task, mixture) cells of
the chain, of protocol (b) on the true final losses, of loss averaging through the chain and on its true losses,
the weighted-loss error of step 1 alone, and the coverage of the 80% intervals (score, and weighted loss).

    PYTHONPATH=/work/main python benchmarks/ladder/scaling.py [--data benchmarks/ladder/data]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import Ladder, baseline_losses, load_ladder, small_to_largest
from train import SIZES
from world import MAX_LENGTH, TASKS

from csv_callback.evaluator import parameter_count
from csv_callback.fit import fit_link
from csv_callback.scaling import fit_scaling_law, predict_score
from csv_callback.store import load_losses
from csv_callback.testing import tiny_gpt2

LEVEL = 0.8


def size_params(data: Path) -> dict[str, int]:
    """Each size's parameter count: the GPT-2 of ``train.SIZES`` built on the ladder's tokenizer, counted as the
    callbacks count it (:func:`~csv_callback.evaluator.parameter_count`), checked against what train.py recorded."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(data / "model"))
    counts = {s: parameter_count(tiny_gpt2(vocab, n_positions=MAX_LENGTH, n_layer=nl, n_embd=ne))
              for s, (nl, ne) in SIZES.items()}
    for run in (data / "runs").glob("*/run.json"):
        info = json.loads(run.read_text())
        if info["params"] != counts[info["size"]]:
            raise ValueError(f"{run} records {info['params']} parameters, but SIZES[{info['size']!r}] builds "
                             f"{counts[info['size']]}: the ladder was trained with another configuration.")
    return counts


def tokens_seen(data: Path, ladder: Ladder) -> np.ndarray:
    """``[m]`` the tokens seen at each checkpoint of ``ladder``, as its stores record them (same run order)."""
    runs = sorted(d for d in (data / "runs").iterdir() if (d / "run.json").is_file())
    D = np.concatenate([load_losses(d / "losses").tokens_seen for d in runs])
    if len(D) != len(ladder.steps) or np.isnan(D).any():
        raise ValueError("the stores' tokens_seen do not line up with the ladder's checkpoints; re-run train.py.")
    return D


def chain(N: np.ndarray, D: np.ndarray, L: np.ndarray, target: tuple[float, float]) -> dict:
    """The law fitted to ``L`` ``[k]`` at (N, D) ``[k]``, and its loss with interval at ``target``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in starts the optimizer leaves behind
        law = fit_scaling_law(N, D, L)
    lo, hi = law.interval(*target, LEVEL)
    return {"law": law, "loss": float(law.predict(*target)), "loss_lo": lo, "loss_hi": hi}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default DATA/scaling.json)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default DATA/scaling.png)")
    parser.add_argument("--min-step", type=int, default=0,
                        help="fit only checkpoints at this step or later (default 0: every checkpoint)")
    args = parser.parse_args(argv)
    ladder = load_ladder(args.data)
    params = size_params(args.data)
    D = tokens_seen(args.data, ladder)
    N = np.array([params[s] for s in ladder.sizes], dtype=np.float64)
    largest = max(set(ladder.sizes.tolist()), key=list(SIZES).index)
    small = ladder.sizes != largest
    print(f"{len(N)} checkpoints; N per size {params}; the law is fitted on {sorted(set(ladder.sizes[small]))} and "
          f"predicts {largest} (N = {params[largest]})")
    cells, laws, weighted = [], {}, {}
    for task in TASKS:
        b = small_to_largest(ladder, task)
        sv = b["vector"]
        y = ladder.scores[task]
        wl = weighted[task] = np.asarray(sv.weighted_loss(ladder.losses), dtype=np.float64)
        uniform = baseline_losses(ladder, task)["uniform"]
        uniform_link = fit_link(uniform[small], y[small])
        for mixture in sorted(set(ladder.mixtures)):
            fit = small & (ladder.mixtures == mixture) & (ladder.steps >= args.min_step)
            big = np.flatnonzero((ladder.sizes == largest) & (ladder.mixtures == mixture))
            final = big[np.argmax(ladder.steps[big])]
            target = (float(N[final]), float(D[final]))
            try:
                c = chain(N[fit], D[fit], wl[fit], target)
                pred, lo, hi = predict_score(c["law"], sv, *target, LEVEL)
                u = chain(N[fit], D[fit], uniform[fit], target)
            except (ValueError, np.linalg.LinAlgError) as e:  # a fit that diverged: counted, left out of the errors
                print(f"{task} {mixture}: the law could not be fitted ({type(e).__name__}: {e})")
                cells.append({"task": task, "mixture": mixture, "failed": f"{type(e).__name__}: {e}"})
                continue
            laws[task, mixture] = (c["law"], fit, final)
            cells.append({
                "task": task, "mixture": mixture, "actual": float(y[final]), "target_params": target[0],
                "target_tokens": target[1], "law": c["law"].to_dict(),
                "csv_chain": {"pred": pred, "lo": lo, "hi": hi},
                "csv_true_loss": float(sv.predict(ladder.losses[final])),  # protocol (b) at this checkpoint
                "uniform_chain": float(uniform_link(u["loss"])),
                "uniform_true_loss": float(uniform_link(uniform[final])),
                "weighted_loss": {"actual": float(wl[final]), "pred": c["loss"], "lo": c["loss_lo"],
                                  "hi": c["loss_hi"]},
                "uniform_loss": {"actual": float(uniform[final]), "pred": u["loss"], "lo": u["loss_lo"],
                                 "hi": u["loss_hi"]},
            })
    summary = summarize(cells)
    print_table(cells, summary)
    out = args.out or args.data / "scaling.json"
    out.write_text(json.dumps({"largest": largest, "params": params, "level": LEVEL, "min_step": args.min_step,
                               "summary": summary,
                               "cells": cells}, indent=1))
    plot(cells, laws, weighted, ladder, N, D, largest, args.plot or args.data / "scaling.png")
    print(f"wrote {out}")


METHODS = {
    "csv_chain": lambda c: c["csv_chain"]["pred"],
    "csv_true_loss": lambda c: c["csv_true_loss"],
    "uniform_chain": lambda c: c["uniform_chain"],
    "uniform_true_loss": lambda c: c["uniform_true_loss"],
}


def summarize(cells: list[dict]) -> dict:
    """Per task and pooled: MSE of each method, coverage of the 80% intervals, step 1's relative loss error, over
    the cells whose law could be fitted (every method on the same cells), and how many could not."""
    out = {}
    for task in (*TASKS, "pooled"):
        mine = [c for c in cells if task in ("pooled", c["task"]) and "failed" not in c]
        y = np.array([c["actual"] for c in mine])
        row = {f"mse_{m}": float(np.mean((np.array([f(c) for c in mine]) - y) ** 2)) for m, f in METHODS.items()}
        row["coverage_score"] = float(np.mean([c["csv_chain"]["lo"] <= c["actual"] <= c["csv_chain"]["hi"]
                                               for c in mine]))
        row["coverage_weighted_loss"] = float(np.mean([c["weighted_loss"]["lo"] <= c["weighted_loss"]["actual"]
                                                       <= c["weighted_loss"]["hi"] for c in mine]))
        row["mean_width_score"] = float(np.mean([c["csv_chain"]["hi"] - c["csv_chain"]["lo"] for c in mine]))
        for kind in ("weighted_loss", "uniform_loss"):
            row[f"mean_abs_rel_error_{kind}"] = float(np.mean([abs(c[kind]["pred"] / c[kind]["actual"] - 1)
                                                             for c in mine]))
        row["cells"] = len(mine)
        row["failed_fits"] = sum(task in ("pooled", c["task"]) and "failed" in c for c in cells)
        out[task] = row
    return out


def print_table(cells: list[dict], summary: dict) -> None:
    print(f"\n{'task':<16}{'mixture':<18}{'actual':>8}{'chain':>8}{'lo':>8}{'hi':>8}{'(b)':>8}{'avg chain':>10}"
          f"{'wl true':>9}{'wl law':>8}")
    for c in (c for c in cells if "failed" not in c):
        k = c["csv_chain"]
        print(f"{c['task']:<16}{c['mixture']:<18}{c['actual']:>8.3f}{k['pred']:>8.3f}{k['lo']:>8.3f}{k['hi']:>8.3f}"
              f"{c['csv_true_loss']:>8.3f}{c['uniform_chain']:>10.3f}{c['weighted_loss']['actual']:>9.3f}"
              f"{c['weighted_loss']['pred']:>8.3f}")
    print()
    for task, row in summary.items():
        print(f"{task:<16}" + "  ".join(f"{k} {v:.3g}" for k, v in row.items()))


def plot(cells: list[dict], laws: dict, weighted: dict[str, np.ndarray], ladder: Ladder, N: np.ndarray,
         D: np.ndarray, largest: str, path: Path) -> None:
    """Top row, per task: predicted vs actual final score of the largest size per mixture (the chain with its 80%
    interval, protocol (b), loss averaging's chain). Bottom row, per task: the weighted loss against D for one
    mixture, the smaller sizes' points with the law's curves, and the largest size's points with the law's
    curve at its N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(TASKS), figsize=(5 * len(TASKS), 9.5), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        mine = [c for c in cells if c["task"] == task and "failed" not in c]
        y = np.array([c["actual"] for c in mine])
        k = np.array([[c["csv_chain"][q] for q in ("pred", "lo", "hi")] for c in mine])
        mse = {m: np.mean((np.array([f(c) for c in mine]) - y) ** 2) for m, f in METHODS.items()}
        ax.errorbar(y, k[:, 0], yerr=[k[:, 0] - k[:, 1], k[:, 2] - k[:, 0]], fmt="o", ms=5, capsize=3,
                    label=f"csv through the law (MSE {mse['csv_chain']:.1e})")
        ax.scatter(y, [c["csv_true_loss"] for c in mine], marker="x", label=f"(b): csv on true losses "
                   f"(MSE {mse['csv_true_loss']:.1e})")
        ax.scatter(y, [c["uniform_chain"] for c in mine], marker="s", s=14, alpha=0.7,
                   label=f"loss averaging through the law (MSE {mse['uniform_chain']:.1e})")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(title=f"{task}: {largest} final, per mixture", xlabel="actual accuracy", ylabel="predicted",
               xlim=(0.2, 1), ylim=(0.2, 1))
        ax.legend(fontsize=7)
    mixture = "balanced"
    for ax, task in zip(axes[1], TASKS):
        if (task, mixture) not in laws:
            continue
        law, fit, final = laws[task, mixture]
        predicted = next(c for c in cells if c["task"] == task and c["mixture"] == mixture)["weighted_loss"]["pred"]
        wl = weighted[task]
        sizes = sorted(set(N.tolist()))
        colours = plt.cm.viridis(np.linspace(0, 0.85, len(sizes)))
        rows = ladder.mixtures == mixture
        grid = np.geomspace(D[rows].min(), D[rows].max(), 200)
        for n, col in zip(sizes, colours):
            at = rows & np.isclose(N, n)
            ax.scatter(D[at], wl[at], color=col, s=14, marker="o" if fit[at].all() else "^",
                       label=f"N = {int(n)}" + ("" if fit[at].all() else f" ({largest}, not fitted)"))
            ax.plot(grid, law.predict(n, grid), color=col, lw=1)
        lo, hi = law.interval(N[final], D[final], LEVEL)
        ax.errorbar([D[final]], [predicted], yerr=[[predicted - lo], [hi - predicted]], fmt="k*", ms=9, capsize=3,
                    label="law's prediction (80%)")
        ax.set(xscale="log", xlabel="tokens seen (D)", ylabel="weighted loss", title=f"{task}, mixture {mixture}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
