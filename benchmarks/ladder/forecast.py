"""Forecasting each ladder run's final lm-eval score from its first 25% / 50% of steps (issue 14's target).

Per task and held-out mixture (leave-one-mixture-out, as in ``evaluate.py``'s protocol (a)): the vector is
``fit_salience(groups=mixture)`` on the other mixtures' checkpoints, and its trajectory prior
(:func:`~csv_callback.forecast.trajectory_prior`) is built from the other mixtures' complete runs. Each run of the
held-out mixture is then cut at the checkpoints up to 25% and up to 50% of its steps, and its final checkpoint's
score is forecast three ways:

- "forecast": :func:`~csv_callback.forecast.forecast_score` on the csv weighted loss, with its 80% interval;
- "now": the vector's prediction at the last validation seen;
- "loss averaging": the same forecast on the mean probe loss, with a link ``fit_link`` fitted on the other
  mixtures' checkpoints and its own trajectory prior.

The ladder's schedule (``train.py``): AdamW, linear warm-up over 30 steps, then cosine decay to a tenth of the peak
at step 2000; checkpoints at steps 10, 19, 38, 73, 141, 274, 532, 1031, 2000 (so 6 validations up to 25%, 7 up to
50%).

    PYTHONPATH=/work/main python benchmarks/ladder/forecast.py [--data benchmarks/ladder/data] [--out FILE]
        [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import answer_mask, load_ladder, run_ends, run_labels
from world import TASKS

from csv_callback import SalienceVector, fit_salience
from csv_callback.fit import fit_link
from csv_callback.forecast import forecast_score, trajectory_prior

CUTS = (0.25, 0.5)
LEVEL = 0.8
METHODS = ("forecast", "now", "loss averaging")
# Diagnostics, not forecasts: the run's own trend without the prior (a vector from fit_salience carries none), and
# the vector's prediction at the run's true final weighted loss (what a perfect loss forecast would give).
DIAGNOSTICS = ("own trend only", "at the final loss")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the leave-one-mixture-out vectors here and reuse them on the next run (the fits "
                             "are most of the time; delete the directory when the ladder's data changes)")
    args = parser.parse_args(argv)
    ladder = load_ladder(args.data)
    runs, end = run_labels(ladder), run_ends(ladder)
    mean_loss = ladder.losses.mean(1, dtype=np.float64)
    rows = []
    for task in TASKS:
        y = ladder.scores[task]
        for mixture in np.unique(ladder.mixtures):
            train = ladder.mixtures != mixture
            cached = args.cache / f"{task}-without-{mixture}.safetensors" if args.cache else None
            if cached is not None and cached.is_file():
                sv = SalienceVector.load(cached)
            else:
                sv = fit_salience(ladder.losses[train], y[train], groups=ladder.mixtures[train], probe=ladder.probe,
                                  answer_mask=answer_mask(ladder, task), task=task)
                if cached is not None:
                    args.cache.mkdir(parents=True, exist_ok=True)
                    sv.save(cached)
            prior = trajectory_prior(sv, ladder.losses[train], ladder.steps[train], runs[train], end[train])
            n = ladder.probe.n_tokens
            uni = SalienceVector(np.full(n, 1.0 / n), fit_link(mean_loss[train], y[train]), task=task)
            uni_prior = trajectory_prior(uni, ladder.losses[train], ladder.steps[train], runs[train], end[train])
            for run in np.unique(runs[~train]):
                idx = np.flatnonzero(runs == run)
                idx = idx[np.argsort(ladder.steps[idx])]
                steps, x_end, final = ladder.steps[idx], float(end[idx[0]]), float(y[idx[-1]])
                wl = np.asarray(sv.weighted_loss(ladder.losses[idx]))
                for cut in CUTS:
                    seen = steps <= cut * x_end
                    pred, lo, hi = forecast_score(steps[seen], wl[seen], x_end, sv, LEVEL, prior)
                    with warnings.catch_warnings():  # the hand-built uniform vector has no link interval
                        warnings.simplefilter("ignore", RuntimeWarning)
                        pred_u = forecast_score(steps[seen], mean_loss[idx][seen], x_end, uni, LEVEL, uni_prior)[0]
                    rows.append({"task": task, "run": run, "cut": cut, "final": final, "seen": int(seen.sum()),
                                 "forecast": pred, "lo": lo, "hi": hi, "now": float(sv.link(wl[seen][-1])),
                                 "loss averaging": pred_u,
                                 "own trend only": forecast_score(steps[seen], wl[seen], x_end, sv, LEVEL)[0],
                                 "at the final loss": float(sv.link(wl[-1]))})
            print(f"{task} without {mixture}: done", flush=True)
    table = summarise(rows)
    print(f"\n{'task':<16}{'cut':>5}" + "".join(f"{m + ' MSE':>22}" for m in METHODS + DIAGNOSTICS)
          + f"{'ratio to now':>14}{'80% coverage':>14}{'mean width':>12}")
    for t in table.values():
        print(f"{t['task']:<16}{t['cut']:>5}" + "".join(f"{t['mse'][m]:>22.2e}" for m in METHODS + DIAGNOSTICS)
              + f"{t['mse']['forecast'] / t['mse']['now']:>14.2f}{t['coverage']:>14.2f}{t['width']:>12.3f}")
    if args.out:
        args.out.write_text(json.dumps({"table": table, "rows": rows}, indent=1))


def summarise(rows: list[dict]) -> dict:
    out = {}
    for task in (*TASKS, "pooled"):
        for cut in CUTS:
            sel = [r for r in rows if r["cut"] == cut and task in (r["task"], "pooled")]
            y = np.array([r["final"] for r in sel])
            lo, hi = np.array([r["lo"] for r in sel]), np.array([r["hi"] for r in sel])
            out[f"{task}/{cut}"] = {
                "task": task, "cut": cut, "n": len(sel),
                "mse": {m: float(np.mean((np.array([r[m] for r in sel]) - y) ** 2)) for m in METHODS + DIAGNOSTICS},
                "coverage": float(np.mean((y >= lo) & (y <= hi))), "width": float(np.mean(hi - lo))}
    return out


if __name__ == "__main__":
    main()
