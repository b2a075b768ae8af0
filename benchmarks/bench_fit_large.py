"""``csv-callback fit`` at scale: wall time and peak memory of a fresh process fitting m checkpoints x n tokens.

Writes a loss store of synthetic checkpoints (``csv_callback.testing.synthetic_ladder``: 4 data mixtures,
a planted salient token subset) plus a scores CSV with a mixture column, once per (m, n); then runs the real
console script ``csv-callback fit STORE --scores CSV --groups col:mix`` in a subprocess and reports its wall
time, CPU time (user + system, all its threads), the 1-minute load average before and after (the machine
is shared) and its peak resident memory (VmHWM, polled) against the size of one float32 copy of the matrix.

Target (issue 5): m=500, n=1M in < 5 min on 2 cores, holding at most one float32 copy of the matrix.

    PYTHONPATH=. python benchmarks/bench_fit_large.py --rows 500 --tokens 100000
    PYTHONPATH=. python benchmarks/bench_fit_large.py --rows 500 --tokens 1000000 --timeout 1800
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def build_store(root: Path, rows: int, tokens: int) -> None:
    """A loss store and scores.csv for ``rows`` synthetic checkpoints (skipped if already there)."""
    if (root / "scores.csv").is_file():
        return
    import torch

    from csv_callback import ProbeSet
    from csv_callback.store import LossStore
    from csv_callback.testing import synthetic_ladder

    lad = synthetic_ladder(n_tokens=tokens, n_salient=max(40, tokens // 2000), checkpoints_per_mixture=rows // 4)
    # A probe of the right length: the fit only needs its fingerprint and answer mask.
    ids = torch.arange(tokens + 1, dtype=torch.int64) % 1000
    probe = ProbeSet(
        ids,
        torch.tensor([0, tokens + 1]),
        torch.cat([torch.tensor([False]), torch.ones(tokens, dtype=torch.bool)]),
        torch.zeros(tokens, dtype=torch.bool),
        tokenizer_hash="synthetic",
        max_length=tokens + 1,
    )
    store = LossStore(root / "store", probe)
    names = []
    for i in range(len(lad.losses)):
        names.append(f"{lad.groups[i]}/ckpt{i:04d}")
        store.write(names[-1], lad.losses[i], step=i)
    with (root / "scores.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "score", "mix"])
        w.writerows(zip(names, lad.scores.tolist(), lad.groups.tolist()))


def run_fit(root: Path, timeout: float) -> dict[str, float]:
    vector = root / "vector.safetensors"
    vector.unlink(
        missing_ok=True
    )  # the previous run's: `fit` refuses to overwrite it (and an older fit knows no --force)
    cmd = ["csv-callback", "fit", str(root / "store"), "--task", "synthetic", "--scores", str(root / "scores.csv"),
           "--groups", "col:mix", "--out", str(vector)]
    load_before = os.getloadavg()[0]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    while proc.poll() is None and time.perf_counter() - t < timeout:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1]) / 2**20)
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        time.sleep(0.5)
    timed_out = proc.poll() is None
    if timed_out:
        proc.kill()
    out = proc.communicate()[0]
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return {"wall": wall, "cpu": cpu, "peak_gib": peak, "timed_out": timed_out, "output": out,
            "load": (load_before, os.getloadavg()[0]), "returncode": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--dir", default="/tmp/csv_bench_fit", help="where stores are kept between runs")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()

    root = Path(args.dir) / f"m{args.rows}_n{args.tokens}"
    t = time.perf_counter()
    build_store(root, args.rows, args.tokens)
    print(f"store {root}: ready in {time.perf_counter() - t:.0f}s")
    matrix_gib = args.rows * args.tokens * 4 / 2**30
    r = run_fit(root, args.timeout)
    print(r["output"].strip())
    if r["timed_out"]:
        state = f"TIMED OUT after {args.timeout:.0f}s"
    elif r["returncode"]:
        sys.exit(f"m={args.rows} n={args.tokens}: fit FAILED (exit code {r['returncode']}); no timing to report.")
    else:
        state = "finished"
    print(
        f"m={args.rows} n={args.tokens}: fit {state}, wall {r['wall']:.1f}s, CPU {r['cpu']:.1f}s, load "
        f"{r['load'][0]:.1f}->{r['load'][1]:.1f}, date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, peak "
        f"RSS {r['peak_gib']:.2f} GiB = "
        f"{r['peak_gib'] / matrix_gib:.2f}x one float32 matrix ({matrix_gib:.2f} GiB); threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}, python {sys.version.split()[0]}"
    )


if __name__ == "__main__":
    main()
