"""Blind salience (issue 17): does the fit find the salient tokens of a probe when nothing marks them?

Per task of the ladder and per protocol of ``evaluate.py`` ((a) leave-one-mixture-out, (b) small sizes ->
largest), fits a vector twice: blind (``fit_salience`` without ``answer_mask``, as on plain validation text) and
with the marks (the task's answer tokens), each with today's code (a git revision, by default the commit before
issue 17's change, extracted with ``git archive`` and run in a subprocess) and with the working tree's. The
baselines are fitted under the same folds: "uniform" (loss averaging) and "label" (the answer tokens' loss,
which always gets the marks). Per fit: held-out MSE, the prior and lam chosen, the effective number of tokens
and the weight mass on the task's answer tokens (for a blind fit: how much of what it found is what the marks
would have said).

Noise of a cell. A score is one draw of questions (lm-eval's ``acc_stderr`` s_j per checkpoint). Two sets of
predictions p, q of the same N scores y differ in MSE by mean((p - y)^2 - (q - y)^2); redrawing the questions
moves that difference, with p and q held fixed, by a standard deviation of 2 sqrt(sum_j (p_j - q_j)^2 s_j^2) / N.
A method is "within noise" of another when its MSE exceeds the other's by at most 2 of those standard deviations.

    PYTHONPATH=/work/main python benchmarks/ladder/blind.py [--today REV] [--out benchmarks/ladder/data/blind.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PROTOCOLS = ("leave-one-mixture-out", "small->largest")
MODES = ("blind", "marks")
TODAY = "f8bc848"  # the commit before issue 17's change


def fits(data: Path) -> dict:
    """Every (task, protocol, mode) fit with the csv_callback importable here: held-out predictions and facts."""
    from evaluate import answer_mask, load_ladder
    from train import SIZES
    from world import TASKS

    from csv_callback import fit_salience
    from csv_callback.fit import fit_link

    ladder = load_ladder(data)
    largest = max(set(ladder.sizes.tolist()), key=lambda s: list(SIZES).index(s))
    test = ladder.sizes == largest
    out = {}
    for task in TASKS:
        y, answer = ladder.scores[task], answer_mask(ladder, task)
        for protocol in PROTOCOLS:
            for mode in MODES:
                mask = answer if mode == "marks" else None
                if protocol == "leave-one-mixture-out":
                    sv = fit_salience(ladder.losses, y, groups=ladder.mixtures, answer_mask=mask, task=task)
                    pred = {"csv": sv.fit_report["cv_pred"]["csv"], "uniform": sv.fit_report["cv_pred"]["uniform"]}
                    if mode == "marks":
                        pred["label"] = sv.fit_report["cv_pred"]["label"]
                    idx = np.arange(len(y))
                else:
                    sv = fit_salience(ladder.losses[~test], y[~test], groups=ladder.sizes[~test], answer_mask=mask,
                                      task=task)
                    pred = {"csv": sv.predict(ladder.losses[test]).tolist()}
                    for name, L in (("uniform", ladder.losses.mean(1, dtype=np.float64)),
                                    ("label", ladder.losses[:, answer].mean(1, dtype=np.float64))):
                        pred[name] = fit_link(L[~test], y[~test])(L[test]).tolist()
                    idx = np.flatnonzero(test)
                rep = sv.fit_report
                out[f"{task}/{protocol}/{mode}"] = {
                    "pred": pred, "rows": idx.tolist(), "prior": rep["prior"], "lam": rep["lam"],
                    "screened": rep.get("screened"),
                    "effective_tokens": rep["effective_tokens"],
                    "answer_mass": float(sv.weights[answer].sum()), "answer_tokens": int(answer.sum()),
                }
    return out


def run_with(code: Path | None, data: Path) -> dict:
    """:func:`fits` in a fresh process importing csv_callback from ``code`` (None: this interpreter's)."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, "--one", f.name, "--data", str(data)], env=env, check=True)
        return json.loads(Path(f.name).read_text())


def mse_noise(p: np.ndarray, q: np.ndarray, s: np.ndarray) -> float:
    """The standard deviation of MSE(p) - MSE(q) over redrawn questions (score stderr ``s``), p, q held fixed."""
    return float(2 * np.sqrt(np.sum((p - q) ** 2 * s**2)) / len(p))


def table(today: dict, new: dict, data: Path) -> dict:
    from evaluate import load_ladder

    ladder = load_ladder(data)
    cells = {}
    for key, n in new.items():
        task, protocol, _ = key.split("/")
        t = today[key]
        rows = np.asarray(n["rows"])
        y, s = ladder.scores[task][rows], ladder.stderr[task][rows]
        label = np.asarray(new[f"{task}/{protocol}/marks"]["pred"]["label"])
        csv, old, uniform = (np.asarray(x) for x in (n["pred"]["csv"], t["pred"]["csv"], n["pred"]["uniform"]))
        cells[key] = {
            "mse": {name: float(np.mean((p - y) ** 2))
                    for name, p in (("csv", csv), ("csv_today", old), ("uniform", uniform), ("label", label))},
            "noise_vs_today": mse_noise(csv, old, s), "noise_vs_label": mse_noise(csv, label, s),
            "today": {k: t[k] for k in ("prior", "lam", "effective_tokens", "answer_mass")},
            "new": {k: n[k] for k in ("prior", "lam", "screened", "effective_tokens", "answer_mass",
                                      "answer_tokens")},
        }
    return cells


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--today", default=TODAY, help="git revision of today's fit (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="write the cells as JSON here")
    ap.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        args.one.write_text(json.dumps(fits(args.data)))
        return
    with tempfile.TemporaryDirectory() as old_code:
        archive = subprocess.run(["git", "-C", str(HERE.parents[1]), "archive", args.today, "csv_callback"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old_code], input=archive, check=True)
        today = run_with(Path(old_code), args.data)
    new = run_with(None, args.data)
    cells = table(today, new, args.data)
    head = (f"{'cell':<44}{'csv':>10}{'today':>10}{'2sd':>9}{'uniform':>10}{'label':>10}{'2sd':>9}"
            f"{'csv/unif':>9}{'prior':>10}{'screen':>14}{'eff tok':>9}{'ans mass':>9}")
    print(head)
    for key, c in cells.items():
        m, new_ = c["mse"], c["new"]
        print(f"{key:<44}{m['csv']:>10.2e}{m['csv_today']:>10.2e}{2 * c['noise_vs_today']:>9.1e}{m['uniform']:>10.2e}"
              f"{m['label']:>10.2e}{2 * c['noise_vs_label']:>9.1e}{m['csv'] / m['uniform']:>9.2f}{new_['prior']:>10}"
              f"{new_['screened'] or '':>14}{new_['effective_tokens']:>9.0f}{new_['answer_mass']:>9.3f}")
    if args.out:
        args.out.write_text(json.dumps({"today": args.today, "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
