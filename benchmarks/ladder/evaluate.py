"""Does CSV predict the ladder's downstream accuracies where loss averaging fails? Held-out errors per task.

Reads what ``train.py`` wrote, the way a user's workflow would: each run's probe losses with
:func:`~csv_callback.store.load_losses` and its lm-eval results files with
:func:`~csv_callback.lmeval.scores_from_lmeval` (``results[task]["acc,none"]``). Then, per task:

- (a) leave-one-mixture-out: ``fit_salience(groups=mixture)``, whose folds hold out one whole mixture; its
  ``fit_report`` gives held-out MSE/MAE of "csv", "uniform" (mean probe loss + link) and "label"
  (loss of the answer tokens of the probe's lines of the task's source, + link) under the same folds;
- (b) small sizes -> largest: fit on every size but the largest, predict every checkpoint of the largest
  size; the baselines fit their link on the same checkpoints. The fit's cross-validation holds out one size
  at a time (groups = size), since the question is now whether a vector transfers to a size it has not
  seen (under (a) it holds out mixtures, for the same reason).

Next to the errors: the prior the fit chose (uniform or the task's answer tokens), the scores' own sampling
noise (lm-eval's ``acc_stderr`` squared averaged over the predicted checkpoints) and, for (b), how many
checkpoints the vector flags as extrapolating (weighted loss outside the range seen in fitting, what
``SalienceCallback`` logs as ``csv/<task>/extrapolating``) with csv's MSE on the rest.

And the empirical coverage and mean width of csv's prediction intervals at 80% and 95%
(:meth:`~csv_callback.SalienceVector.predict_interval`), per cell and pooled over the tasks per protocol: in (a)
each held-out mixture's interval is the split-conformal one from the held-out residuals of the other mixtures only
(the fit's own folds; nothing of the mixture it covers); in (b) the vector fitted on the smaller sizes predicts the
largest with the intervals it stores (residuals of its folds over the smaller sizes, widened outside its loss
range). Intervals are computed after the fits, which they leave unchanged.

    PYTHONPATH=/work/main python benchmarks/ladder/evaluate.py [--data benchmarks/ladder/data]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import SIZES
from world import TASKS, World

from csv_callback import ProbeSet, fit_salience
from csv_callback.fit import fit_link
from csv_callback.forecast import trajectory_prior, with_prior
from csv_callback.lmeval import scores_from_lmeval
from csv_callback.salience import conformal_quantile
from csv_callback.store import load_losses

METHODS = ("csv", "uniform", "label")
LEVELS = (0.8, 0.95)


@dataclass
class Ladder:
    """All checkpoints: losses ``[m, n]``, scores per task ``[m]``, and each checkpoint's size and mixture."""

    losses: np.ndarray
    scores: dict[str, np.ndarray]
    stderr: dict[str, np.ndarray]  # lm-eval's acc_stderr of each score: its sampling noise over questions
    sizes: np.ndarray
    mixtures: np.ndarray
    steps: np.ndarray
    probe: ProbeSet


def load_ladder(data: Path, mixtures: list[str] | None = None) -> Ladder:
    """Every finished run under ``data/runs`` (only those of ``mixtures``, if given)."""
    probe = ProbeSet.load(data / "probe.safetensors")
    losses, scores, stderr, sizes, groups, steps = [], {t: [] for t in TASKS}, {t: [] for t in TASKS}, [], [], []
    for run_dir in sorted((data / "runs").iterdir()):
        if not (run_dir / "run.json").is_file():
            print(f"skipping {run_dir.name}: no run.json (still training, or interrupted)")
            continue
        mixture = run_dir.name.split("-", 1)[1]
        if mixtures is not None and mixture not in mixtures:
            continue
        info = json.loads((run_dir / "run.json").read_text())
        table = load_losses(run_dir / "losses", fingerprint=probe.fingerprint)
        for task in TASKS:
            for metric, out in (("acc", scores), ("acc_stderr", stderr)):
                got = {
                    s.checkpoint: s.value
                    for s in scores_from_lmeval([run_dir / "lmeval"], task, table.names, metric=metric)
                }
                out[task] += [got[name] for name in table.names]
        losses.append(table.losses)
        sizes += [info["size"]] * len(table.names)
        groups += [mixture] * len(table.names)
        steps += table.steps.tolist()
    return Ladder(np.concatenate(losses), {t: np.array(v) for t, v in scores.items()},
                  {t: np.array(v) for t, v in stderr.items()}, np.array(sizes),
                  np.array(groups), np.array(steps), probe)


def run_labels(ladder: Ladder) -> np.ndarray:
    """``[m]`` each checkpoint's run, ``<size>-<mixture>`` (the run's directory name)."""
    return np.array([f"{s}-{m}" for s, m in zip(ladder.sizes, ladder.mixtures)])


def run_ends(ladder: Ladder) -> np.ndarray:
    """``[m]`` the last step of each checkpoint's run (every ladder run is complete)."""
    runs = run_labels(ladder)
    end = np.zeros(len(runs))
    for r in np.unique(runs):
        end[runs == r] = ladder.steps[runs == r].max()
    return end


def answer_mask(ladder: Ladder, task: str) -> np.ndarray:
    """bool ``[n]``: the answer tokens of the probe lines of the task's own source."""
    return World.answer_masks(ladder.probe)[task].numpy()


def baseline_losses(ladder: Ladder, task: str) -> dict[str, np.ndarray]:
    """``[m]`` per baseline: the mean probe loss ("uniform") and the task's answer tokens' mean loss ("label")."""
    answer = answer_mask(ladder, task)
    return {
        "uniform": ladder.losses.mean(1, dtype=np.float64),
        "label": ladder.losses[:, answer].mean(1, dtype=np.float64),
    }


def leave_one_mixture_out(ladder: Ladder, task: str) -> dict:
    sv = fit_salience(ladder.losses, ladder.scores[task], groups=ladder.mixtures, probe=ladder.probe,
                      answer_mask=answer_mask(ladder, task), task=task)
    rep = sv.fit_report
    pred, y, folds = np.asarray(rep["cv_pred"]["csv"]), ladder.scores[task], np.asarray(rep["folds"])
    bands = {}
    for level in LEVELS:
        lo, hi = np.empty_like(pred), np.empty_like(pred)
        for f in np.unique(folds):
            held = folds == f
            q = conformal_quantile(np.sort(np.abs(pred - y)[~held]), level)
            lo[held], hi[held] = np.clip(pred[held] - q, *sv.score_range), np.clip(pred[held] + q, *sv.score_range)
        bands[level] = (lo, hi)
    return {"mse": rep["cv_mse"], "mae": rep["cv_mae"], "prior": rep["prior"], "interval": coverage(bands, y),
            "score_noise": float(np.mean(ladder.stderr[task] ** 2)),
            "pred": {k: np.asarray(v) for k, v in rep["cv_pred"].items()}, "actual": ladder.scores[task], "vector": sv}


def small_to_largest(ladder: Ladder, task: str) -> dict:
    largest = max(set(ladder.sizes.tolist()), key=lambda s: list(SIZES).index(s))
    test = ladder.sizes == largest
    y = ladder.scores[task]
    sv = fit_salience(ladder.losses[~test], y[~test], groups=ladder.sizes[~test], probe=ladder.probe,
                      answer_mask=answer_mask(ladder, task), task=task)
    pred = {"csv": np.asarray(sv.predict(ladder.losses[test]))}
    # What SalienceCallback logs as csv/<task>/extrapolating: the weighted loss is outside the fitted range.
    flagged = np.asarray(sv.extrapolates(np.asarray(sv.weighted_loss(ladder.losses[test]))))
    in_range = float(np.mean((pred["csv"][~flagged] - y[test][~flagged]) ** 2))
    bands = {level: sv.predict_interval(ladder.losses[test], level) for level in LEVELS}
    for name, L in baseline_losses(ladder, task).items():
        pred[name] = fit_link(L[~test], y[~test])(L[test])
    return {"mse": {k: float(np.mean((p - y[test]) ** 2)) for k, p in pred.items()},
            "mae": {k: float(np.mean(np.abs(p - y[test]))) for k, p in pred.items()},
            "pred": pred, "actual": y[test], "largest": largest, "prior": sv.fit_report["prior"],
            "interval": coverage(bands, y[test]),
            "score_noise": float(np.mean(ladder.stderr[task][test] ** 2)),
            "extrapolating": {"flagged": int(flagged.sum()), "of": int(test.sum()), "csv_mse_in_range": in_range},
            "vector": sv}


def coverage(bands: dict[float, tuple[np.ndarray, np.ndarray]], y: np.ndarray) -> dict[str, dict]:
    """Per level: the share of scores ``y`` ``[m]`` inside their interval (``bands[level]``, lo and hi ``[m]``), the
    mean width, and the counts behind the share (to pool cells)."""
    out = {}
    for level, (lo, hi) in bands.items():
        inside = (y >= lo) & (y <= hi)
        out[str(level)] = {"coverage": float(inside.mean()), "width": float(np.mean(hi - lo)),
                           "covered": int(inside.sum()), "of": len(y)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of predicted vs actual here")
    parser.add_argument("--mixtures", nargs="+", default=None, help="use only these mixtures' runs")
    parser.add_argument("--vectors", type=Path, default=None,
                        help="save each task's vector fitted on every checkpoint, and the probe, in this directory")
    args = parser.parse_args(argv)
    ladder = load_ladder(args.data, args.mixtures)
    print(
        f"{len(ladder.steps)} checkpoints, sizes {sorted(set(ladder.sizes))}, mixtures {sorted(set(ladder.mixtures))}, "
        f"probe {ladder.probe.n_tokens} tokens"
    )
    for task in TASKS:
        y = ladder.scores[task]
        # A score is one draw of questions: a perfect predictor of the model's expected accuracy would still
        # be off by this much (lm-eval's acc_stderr squared, averaged over checkpoints).
        print(f"{task}: accuracy {y.min():.3f} .. {y.max():.3f}, sampling noise of a score (mean acc_stderr^2) "
              f"{np.mean(ladder.stderr[task] ** 2):.2e}")
    table, results = {}, {}
    print(f"\n{'task':<16}{'protocol':<24}" + "".join(f"{m + ' MSE':>13}{m + ' MAE':>13}" for m in METHODS))
    for task in TASKS:
        for protocol, fn in (("leave-one-mixture-out", leave_one_mixture_out), ("small->largest", small_to_largest)):
            r = fn(ladder, task)
            results[task, protocol] = r
            table[f"{task}/{protocol}"] = {k: r[k] for k in ("mse", "mae", "prior", "score_noise", "interval")}
            print(f"{task:<16}{protocol:<24}" + "".join(f"{r['mse'][m]:>13.2e}{r['mae'][m]:>13.4f}" for m in METHODS))
            print(f"{'':<16}{'':<24}csv intervals: " + ", ".join(
                f"{float(lv):.0%} covers {c['coverage']:.2f} (mean width {c['width']:.3f})"
                for lv, c in r["interval"].items()))
            if "extrapolating" in r:
                table[f"{task}/{protocol}"]["extrapolating"] = x = r["extrapolating"]
                print(f"{'':<16}{'':<24}csv flags {x['flagged']} of {x['of']} as extrapolating; "
                      f"csv MSE on the others {x['csv_mse_in_range']:.2e}")
    for protocol in ("leave-one-mixture-out", "small->largest"):
        cells = [results[task, protocol]["interval"] for task in TASKS]
        pooled: dict[str, dict] = {}
        table[f"pooled/{protocol}"] = {"interval": pooled}
        for level in map(str, LEVELS):
            covered, of = sum(c[level]["covered"] for c in cells), sum(c[level]["of"] for c in cells)
            width = sum(c[level]["width"] * c[level]["of"] for c in cells) / of
            pooled[level] = {"coverage": covered / of, "width": width, "covered": covered, "of": of}
            print(f"pooled over tasks, {protocol}: {float(level):.0%} interval covers {covered / of:.3f} "
                  f"({covered} of {of}), mean width {width:.3f}")
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))
    if args.vectors:
        # Protocol (a)'s vector is fitted on all checkpoints (its strength chosen by leave-one-mixture-out CV), and
        # carries the trajectory prior of all 36 runs for the callbacks' end-of-run forecast.
        args.vectors.mkdir(parents=True, exist_ok=True)
        ladder.probe.save(args.vectors / "probe.safetensors")
        runs, end = run_labels(ladder), run_ends(ladder)
        for task in TASKS:
            sv = results[task, "leave-one-mixture-out"]["vector"]
            sv = with_prior(sv, trajectory_prior(sv, ladder.losses, ladder.steps, runs, end))
            sv.save(args.vectors / f"{task}.safetensors")
    if args.plot:
        plot(results, args.plot)


def plot(results: dict, path: Path) -> None:
    """One panel per (task, protocol): held-out predicted vs actual accuracy, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(results)
    fig, axes = plt.subplots(2, len(TASKS), figsize=(4 * len(TASKS), 8), squeeze=False)
    for ax, (task, protocol) in zip(axes.T.ravel(), keys):
        r = results[task, protocol]
        for method in METHODS:
            ax.scatter(r["actual"], r["pred"][method], s=12, alpha=0.7,
                       label=f"{method} (MSE {r['mse'][method]:.1e})")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(title=f"{task}\n{protocol}", xlabel="actual accuracy (lm-eval acc)", ylabel="predicted", xlim=(0, 1),
               ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
