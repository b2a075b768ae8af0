"""Domain vectors on the ladder, side by side with token vectors: held-out errors per task.

A domain vector weighs a few validation losses a run already logs; a token vector weighs every token of the
probe. The ladder's probe has four segments (:meth:`world.World.domain_ranges`): held-out general text and
``PROBE_LINES`` lines of each capability source. Each checkpoint's domain loss is the mean stored probe token
loss over a segment, exactly the mean validation loss a run would log on that segment as its own dataloader, so
the two vectors see the same tokens at two grains.

Per task, under evaluate.py's protocol (a), leave-one-mixture-out (``fit_salience(groups=mixture)``, one mixture
held out per fold, the same folds), the held-out MSE of:

- "token csv": the token vector, and "answer tokens": the loss of the answer tokens of the task's source + link
  (the "label" baseline), both read from evaluate.json (same folds; not refitted), as is "token mean": the
  mean probe token loss + link;
- "domain csv": the domain vector over the four domain losses;
- "domain mean": the mean of the four domain losses + link (loss averaging at the domain grain);
- "best domain": the single domain whose link fits each fold's training checkpoints best.

    PYTHONPATH=/work/main python benchmarks/ladder/domains.py [--data benchmarks/ladder/data]
        [--out benchmarks/ladder/data/domains.json] [--vectors examples/assets]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate import Ladder, load_ladder, run_ends, run_labels
from world import DOMAINS, SOURCES, TASKS, World

from csv_callback import SalienceVector, fit_salience
from csv_callback.forecast import trajectory_prior, with_prior

PROTOCOL = "leave-one-mixture-out"
# Output columns: (name in domains.json, where it comes from: evaluate.json's method or this fit's report key).
FROM_EVALUATE = {"token csv": "csv", "answer tokens": "label", "token mean": "uniform"}
FROM_DOMAIN_FIT = {"domain csv": "csv", "domain mean": "uniform", "best domain": "domain"}


def domain_losses(ladder: Ladder) -> np.ndarray:
    """float64 ``[m, len(DOMAINS)]``: each checkpoint's mean probe token loss over each domain's segment."""
    ranges = World.domain_ranges(ladder.probe)
    return np.stack([ladder.losses[:, lo:hi].mean(1, dtype=np.float64) for lo, hi in ranges.values()], axis=1)


def fit_domains(ladder: Ladder, losses: np.ndarray, task: str) -> SalienceVector:
    """The task's domain vector on every checkpoint, its report cross-validated over whole mixtures."""
    return fit_salience(losses, ladder.scores[task], groups=ladder.mixtures, domains=DOMAINS, task=task)


def compare(evaluate: dict, vector: SalienceVector, task: str) -> dict:
    """One task's row: held-out MSE per method, the domain vector's weights, the chosen domain and strength."""
    token = evaluate.get(f"{task}/{PROTOCOL}")
    if token is None:
        raise ValueError(f"evaluate.json has no {task}/{PROTOCOL} cell; run benchmarks/ladder/evaluate.py --out first.")
    rep = vector.fit_report
    mse = {k: token["mse"][m] for k, m in FROM_EVALUATE.items()}
    mse |= {k: rep["cv_mse"][m] for k, m in FROM_DOMAIN_FIT.items()}
    # Per held-out mixture, to see which fold an average is made of.
    y, held = np.asarray(rep["scores"]), np.asarray(rep["groups"])
    by_mixture = {k: {g: float(np.mean((np.asarray(rep["cv_pred"][m])[held == g] - y[held == g]) ** 2))
                      for g in sorted(set(held.tolist()))} for k, m in FROM_DOMAIN_FIT.items()}
    return {"mse": mse, "mse_by_mixture": by_mixture, "weights": dict(zip(DOMAINS, vector.weights.tolist())),
            "best_domain": rep["best_domain"], "lam": rep["lam"], "n_checkpoints": rep["n_checkpoints"],
            "score_noise": token["score_noise"]}


def main(argv: list[str] | None = None) -> dict:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=here / "data")
    parser.add_argument("--evaluate", type=Path, default=None,
                        help="evaluate.py's JSON with the token vectors' errors (default: DATA/evaluate.json)")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    parser.add_argument("--vectors", type=Path, default=None,
                        help="save each task's domain vector fitted on every checkpoint here, as "
                             "domain_ladder_<source>.safetensors")
    args = parser.parse_args(argv)
    evaluate_json = args.evaluate or args.data / "evaluate.json"
    if not evaluate_json.is_file():
        parser.error(f"{evaluate_json} does not exist; run benchmarks/ladder/evaluate.py --out {evaluate_json} first.")
    evaluate = json.loads(evaluate_json.read_text())
    ladder = load_ladder(args.data)
    losses = domain_losses(ladder)
    print(f"{len(ladder.steps)} checkpoints, {len(set(ladder.mixtures))} mixtures; domains {', '.join(DOMAINS)} "
          f"({', '.join(f'{d} {hi - lo}' for d, (lo, hi) in World.domain_ranges(ladder.probe).items())} tokens)")
    table, vectors = {}, {}
    columns = [*FROM_EVALUATE, *FROM_DOMAIN_FIT]
    print(f"\nheld-out MSE, {PROTOCOL}\n{'task':<16}" + "".join(f"{c:>15}" for c in columns)
          + f"{'best (all)':>12}  domain weights ({', '.join(DOMAINS)})")
    for task in TASKS:
        vectors[task] = fit_domains(ladder, losses, task)
        row = table[task] = compare(evaluate, vectors[task], task)
        print(f"{task:<16}" + "".join(f"{row['mse'][c]:>15.2e}" for c in columns) + f"{row['best_domain']:>12}  "
              + ", ".join(f"{w:.2f}" for w in row["weights"].values()))
    if args.out:
        args.out.write_text(json.dumps({"protocol": PROTOCOL, "domains": list(DOMAINS), "tasks": table}, indent=1))
    if args.vectors:
        # As evaluate.py's token vectors: fitted on all checkpoints, with the trajectory prior of all 36 runs for the
        # callbacks' end-of-run forecast.
        args.vectors.mkdir(parents=True, exist_ok=True)
        runs, end = run_labels(ladder), run_ends(ladder)
        for source, task in zip(SOURCES, TASKS):
            sv = with_prior(vectors[task], trajectory_prior(vectors[task], losses, ladder.steps, runs, end))
            sv.save(args.vectors / f"domain_ladder_{source}.safetensors")
    return table


if __name__ == "__main__":
    main()
