"""fit_salience at the issue's size: m=200 checkpoints, n=100k tokens (targets: <= 30 s, <= 2 GB, 2 cores).

Each run is a fresh process: it builds ``synthetic_ladder(n_tokens=100_000, n_salient=2000,
checkpoints_per_mixture=50)`` (4 mixtures x 50 checkpoints, cross-validated over the mixtures; with
``--groups G``, G mixtures of 200 // G checkpoints whose shares of capability data are spaced evenly from 0.05
to 0.6, so that each group is its own fold up to 10 groups), times ``fit_salience`` and reports the solver's
rounds (each one evaluation of every path) and the process's peak resident memory (the kernel's ``VmHWM``,
which includes Python, numpy, scipy and torch themselves and the 80 MB of losses), its CPU time (the fit's
products run in two threads, so on a quiet machine wall time is about half the CPU time), the 1-minute load
average around it, plus the fit's quality: held-out MSE of csv, uniform (loss averaging) and label, where the
answer mask is the planted salient tokens (so "label" is an oracle that knows them), and the weight mass the fit
puts on the salient tokens. ``--blind`` fits without the answer mask, as on plain text (screened priors; "label"
still gets the mask as a baseline).

    PYTHONPATH=. python benchmarks/bench_fit.py [--runs 5] [--groups 4] [--blind] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def one_run(groups: int, blind: bool) -> dict:
    import numpy as np

    from csv_callback import solver
    from csv_callback.fit import fit_link, fit_salience
    from csv_callback.testing import synthetic_ladder

    shares = (0.05, 0.15, 0.35, 0.6) if groups == 4 else tuple(np.linspace(0.05, 0.6, groups))
    lad = synthetic_ladder(n_tokens=100_000, n_salient=2000, shares=shares, checkpoints_per_mixture=200 // groups)
    rounds = 0
    answer_round = solver._LockStep._round

    def counted_round(self, requests):  # counts the solver's rounds: the fit's time is rounds x time per round
        nonlocal rounds
        rounds += 1
        return answer_round(self, requests)

    solver._LockStep._round = counted_round
    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    sv = fit_salience(lad.losses, lad.scores, groups=lad.groups, answer_mask=None if blind else lad.salient)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rep = sv.fit_report
    if blind:  # the label baseline under the same folds, as a fit with the mask reports it
        label = lad.losses[:, lad.salient].mean(1, dtype=np.float64)
        folds = np.asarray(rep["folds"])
        pred = np.empty(len(label))
        for f in np.unique(folds):
            pred[folds == f] = fit_link(label[folds != f], lad.scores[folds != f])(label[folds == f])
        rep["cv_mse"]["label"] = float(np.mean((pred - lad.scores) ** 2))
    return {
        "groups": groups,
        "blind": blind,
        "prior": rep["prior"] if not rep.get("screened") else f"screened:{rep['screened']}",
        "folds": len(set(rep["folds"])),
        "paths": (len(rep["cv_mse_path"]) + len(rep.get("cv_mse_screened", {}))) * (len(set(rep["folds"])) + 1),
        "rounds": rounds,
        "wall_s": wall,
        "cpu_s": cpu,
        "loadavg_1min_after": os.getloadavg()[0],
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "loadavg_1min_before": load_before,
        "shape": list(lad.losses.shape),
        "cv_mse": rep["cv_mse"],
        "cv_mae": rep["cv_mae"],
        "lam": rep["lam"],
        "salient_mass": float(sv.weights[lad.salient].sum()),
        "effective_tokens": rep["effective_tokens"],
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--groups", type=int, default=4,
                    help="mixtures = cross-validation groups, 2 to 200 (default 4; each its own fold up to 10)")
    ap.add_argument("--blind", action="store_true", help="fit without the answer mask (screened priors)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 2 <= args.groups <= 200:
        ap.error(f"--groups must be 2 to 200 (each group needs a checkpoint of the 200), got {args.groups}")
    if args.one:
        print(json.dumps(one_run(args.groups, args.blind)))
        return
    runs = []
    for i in range(args.runs):
        cmd = [sys.executable, __file__, "--one", "--groups", str(args.groups), *(["--blind"] * args.blind)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(
            f"run {i}: {r['groups']} groups, {r['folds']} folds, {r['paths']} paths, {r['rounds']} rounds: "
            f"{r['wall_s']:.1f} s (CPU {r['cpu_s']:.1f} s, {1e3 * r['cpu_s'] / r['rounds']:.0f} ms per round), "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB, "
            f"load {r['loadavg_1min_before']:.1f}->{r['loadavg_1min_after']:.1f}, "
            f"cv_mse csv {r['cv_mse']['csv']:.2e} uniform {r['cv_mse']['uniform']:.2e} label "
            f"{r['cv_mse']['label']:.2e}, "
            f"salient mass {r['salient_mass']:.3f}, chosen {r['prior']}",
            flush=True,
        )
    summary = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "min_wall_s": min(r["wall_s"] for r in runs),
        "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "max_peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "runs": runs,
    }
    print(f"median {summary['median_wall_s']:.1f} s (min {summary['min_wall_s']:.1f} s, median CPU "
          f"{summary['median_cpu_s']:.1f} s), "
          f"max peak RSS {summary['max_peak_rss_mib']:.0f} MiB over {len(runs)} runs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
