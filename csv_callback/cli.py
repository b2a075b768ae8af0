"""csv-callback: build probes, collect losses from checkpoints, fit, predict and report, offline.

Typical session::

    csv-callback probe probe_texts.txt --tokenizer ./tok --out probe.safetensors
    csv-callback collect runs/*/checkpoint-* --probe probe.safetensors --out losses/ --name-parts 2
    csv-callback fit losses/ --task arc_easy --lmeval lm_eval_out/ --groups 're:^([^/]+)/' --out arc_easy.safetensors
    csv-callback predict losses/ arc_easy.safetensors
    csv-callback forecast run1/probe_losses/ arc_easy.safetensors --end 20000
    csv-callback scaling ladder/*/probe_losses --vector arc_easy.safetensors --target-params 1e9 --target-tokens 2e10
    csv-callback report arc_easy.safetensors --losses losses/ --tokenizer ./tok --out report/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .fit import PRIORS
from .forecast import PRIOR_KEY, running_forecast
from .probe import ProbeMismatchError, ProbeSet
from .salience import SalienceVector, check_level
from .store import LossStore, LossTable, load_losses


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (2 for bad input, 1 when the system fails, e.g.
    a full disk, 130 when interrupted, 141 when the reader of its output has gone, as after SIGPIPE)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # a reader that has gone away shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        # `csv-callback predict ... | head`: the reader has what it wanted. Point stdout at devnull so the exit
        # flush of what is still buffered cannot fail again, and exit as a process ended by SIGPIPE does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, FileNotFoundError) as e:
        print(f"csv-callback {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: a full disk, a lost mount
        print(f"csv-callback {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"csv-callback {args.command}: interrupted; everything finished so far is saved, "
              "re-run the same command to continue.", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csv-callback",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("probe", help="build a probe set from texts or (context, continuation) pairs",
                       description="Tokenize probe inputs into a ProbeSet (.safetensors). A .jsonl file holds one "
                       "JSON object per line: {\"context\": ..., \"continuation\": ...} pairs (only the continuation "
                       "is scored, as lm-eval-harness scores answers) or {\"text\": ...} texts. Any other file is "
                       "plain text; blank lines separate texts. Several inputs are joined into one probe.")
    s.add_argument("inputs", nargs="+", help="text, JSONL-of-texts or JSONL-of-pairs files")
    s.add_argument("--tokenizer", required=True, help="local tokenizer directory (AutoTokenizer.from_pretrained)")
    s.add_argument("--out", required=True, help="output .safetensors file")
    s.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (default 1024)")
    s.add_argument("--text-field", default="text", help="JSON key of a text in JSONL input (default 'text')")
    s.add_argument("--score-context", action="store_true", help="also score the context tokens of pairs")
    s.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    s.set_defaults(func=cmd_probe)

    s = sub.add_parser("collect", help="per-token probe losses of saved checkpoints into a loss store",
                       description="Evaluate the probe on each checkpoint (a Hugging Face model directory, or a "
                       "Lightning .ckpt file with --module) and store its per-token losses in OUT, the format of "
                       "SalienceCallback(save_dir=...). Checkpoints already in OUT are skipped, so an interrupted "
                       "run resumes where it stopped. Lightning checkpoints are read with torch.load("
                       "weights_only=True) unless --trust-checkpoints.")
    s.add_argument("checkpoints", nargs="+", help="HF model directories and/or Lightning .ckpt files")
    s.add_argument("--out", required=True, help="loss store directory (created if missing)")
    s.add_argument("--probe", help="probe .safetensors (default: the one already in --out)")
    s.add_argument("--module", help="LightningModule class of .ckpt files, as package.module:ClassName")
    s.add_argument("--trust-checkpoints", action="store_true",
                   help="fully unpickle .ckpt files (runs code from the file: only for files you wrote)")
    s.add_argument("--name-parts", type=int, default=1,
                   help="name each checkpoint by its last N path components (default 1; e.g. 2 for run/step)")
    s.add_argument("--batch-size", type=int, default=8, help="probe sequences per forward pass (default 8)")
    s.add_argument("--device", default="auto", help="torch device; 'auto' is cuda when available, else cpu")
    s.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (losses stay float32)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_collect)

    s = sub.add_parser("fit", help="fit a salience vector from collected losses and benchmark scores",
                       description="Fit a salience vector for one task from a loss store and the checkpoints' "
                       "scores, from lm-eval-harness results files (--lmeval) or a CSV (--scores), and print the "
                       "cross-validated error of csv vs uniform (loss averaging) vs label (answer-token loss). With "
                       "--loss-columns, fit a domain vector from one CSV table instead (one row per checkpoint: its "
                       "per-domain validation losses, its score, its group), e.g. a W&B history export; the "
                       "baselines are then loss averaging and the best single domain.")
    s.add_argument("losses", nargs="+", help="loss store directory (from collect or SalienceCallback(save_dir=...)); "
                   "several (e.g. one save_dir per run) name their checkpoints <store>/<name>, the store's path "
                   "relative to their common parent. With --loss-columns: one CSV table")
    s.add_argument("--task", required=True, help="task name (as in the lm-eval results)")
    s.add_argument("--out", required=True, help="output vector .safetensors")
    s.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    s.add_argument("--loss-columns", nargs="+", metavar="PATTERN",
                   help="fit a domain vector from the CSV table: its loss columns, shell patterns such as 'loss/*' "
                   "(a pattern PREFIX*SUFFIX names each domain by what * matched); scores from --score-column, "
                   "groups from --groups col:NAME")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--lmeval", nargs="+", metavar="PATH", help="lm-eval results_*.json files or output directories")
    src.add_argument("--scores", metavar="CSV", help="CSV with columns checkpoint,score")
    s.add_argument("--metric", default="acc", help="metric name (default acc)")
    s.add_argument("--filter", default="none", help="lm-eval filter name (default none)")
    s.add_argument("--mapping", metavar="CSV", help="CSV with columns model,checkpoint: lm-eval's model -> checkpoint")
    s.add_argument("--score-column", default="score", help="score column of --scores or of the --loss-columns table "
                   "(default score)")
    s.add_argument("--groups", metavar="SPEC",
                   help="held-out unit for cross-validation: 're:REGEX' (first capture group, or the match, of the "
                   "checkpoint name) or 'col:NAME' (a column of --scores). Default: random folds over checkpoints")
    s.add_argument("--folds", type=int, default=None,
                   help="folds when there are many groups or none (default 5, or one checkpoint per fold below 5)")
    s.add_argument("--seed", type=int, default=0, help="seed of random folds (default 0)")
    s.add_argument("--priors", nargs="+", choices=PRIORS, default=None,
                   help="what the weights are shrunk towards, chosen by cross-validation: uniform (loss averaging) "
                   "and/or answer (the probe's answer tokens). Default: both when the probe has answer tokens")
    s.add_argument("--anchor", nargs=2, type=float, metavar=("LOSS", "SCORE"), default=None,
                   help="one extra point every link must fit, e.g. '0 1' (zero loss scores 1, as the OLMo ladder "
                   "assumes): pins the top of the curve when no checkpoint comes near it. Default: none")
    s.add_argument("--score-range", nargs=2, type=float, metavar=("LO", "HI"), default=None,
                   help="the scores the metric can take, e.g. '0 100' for percentages; it bounds the link. Default: "
                   "0 1 for --metric acc or when every score lies in [0, 1], else unbounded")
    s.add_argument("--trajectory-prior", action="store_true",
                   help="also store in the vector how its fitting runs moved to their end, for the end-of-run "
                   "forecast (the callbacks' csv/<task>/forecast, csv-callback forecast): each store must be one "
                   "complete run (a training run's save_dir), its last step the run's end; needs >= 2 stores")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("predict", help="apply salience vectors to collected losses",
                       description="Predicted scores of every checkpoint in a loss store, for each vector.")
    s.add_argument("losses", help="loss store directory")
    s.add_argument("vectors", nargs="+", help="salience vector .safetensors files")
    s.add_argument("--json", action="store_true", help="print JSON records instead of a table; each has the "
                   "prediction interval at --level as pred_lo, pred_hi")
    s.add_argument("--level", type=float, default=0.8,
                   help="coverage of the interval in the JSON records, in (0, 1) (default 0.8)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("forecast", help="the end-of-run forecast at each training evaluation of a stored run",
                       description="For each training evaluation of one run's loss store (its save_dir: "
                       "checkpoints named step-<N>, steps > 0, in step order) and each vector, the score forecast at "
                       "step --end from the evaluations up to it, as the callbacks log it live (csv/<task>/forecast, "
                       "forecast_lo, forecast_hi): before the third evaluation the prediction now with everything the "
                       "link can give as interval, then the forecast from the run's own trend and the vector's "
                       "trajectory prior (fit --trajectory-prior), and at or after --end the prediction now with its "
                       "interval.")
    s.add_argument("losses", help="loss store directory of one training run (SalienceCallback(save_dir=...))")
    s.add_argument("vectors", nargs="+", help="salience vector .safetensors files")
    s.add_argument("--end", type=int, required=True, metavar="STEP",
                   help="the training step whose score is forecast, e.g. the run's max_steps")
    s.add_argument("--level", type=float, default=0.8, help="coverage of the forecast's interval, in (0, 1) "
                   "(default 0.8)")
    s.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    s.set_defaults(func=cmd_forecast)

    s = sub.add_parser("scaling", help="a scaling law of the weighted loss over a ladder of runs, and the score it "
                       "predicts for a new (N, D)",
                       description="Fit L(N, D) = E + A / N^alpha + B / D^beta (csv_callback.scaling: the OLMo "
                       "ladder's step 1, Huber on log residuals) to the vector's weighted losses of the stores' "
                       "checkpoints (N: the model's parameter count, D: tokens seen, both recorded by the callbacks "
                       "with every evaluation), then predict the weighted loss and, through the vector's link, the "
                       "score at --target-params and --target-tokens, each with its interval at --level.")
    s.add_argument("stores", nargs="+", help="loss store directories, one per run of the ladder (the callbacks' "
                   "save_dir)")
    s.add_argument("--vector", required=True, help="salience vector .safetensors fitted on the stores' probe")
    s.add_argument("--target-params", type=float, required=True, metavar="N",
                   help="parameter count of the model to predict")
    s.add_argument("--target-tokens", type=float, required=True, metavar="D", help="its training tokens")
    s.add_argument("--level", type=float, default=0.8, help="coverage of the intervals, in (0, 1) (default 0.8)")
    s.add_argument("--final-only", action="store_true",
                   help="fit each store's final checkpoint only (one point per run) instead of every checkpoint. "
                   "The right choice to predict a new model size: the checkpoints of one run are correlated, so "
                   "fitted all together they make the interval too narrow for a new run; it needs 5 or more runs")
    s.add_argument("--plot", metavar="PNG", help="draw the weighted loss against D per N with the law's curves and "
                   "the target with its interval")
    s.add_argument("--json", action="store_true", help="print the law, the points and the prediction as JSON")
    s.set_defaults(func=cmd_scaling)

    s = sub.add_parser("report", help="HTML page + PNGs: cross-validation, fitted link, token salience",
                       description="Write DIR/index.html (self-contained) and PNGs for a fitted vector: predicted vs "
                       "actual under cross-validation per method, weighted loss -> score with the fitted link, and "
                       "the probe text with each token's salience as colour.")
    s.add_argument("vector", help="salience vector .safetensors (from fit)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--losses", help="loss store: its probe and checkpoints are shown too")
    s.add_argument("--probe", help="probe .safetensors (default: the loss store's)")
    s.add_argument("--tokenizer", help="tokenizer directory, to show probe tokens as text (else as ids)")
    s.add_argument("--top", type=int, default=12, help="probe sequences shown, most salient first (default 12)")
    s.set_defaults(func=cmd_report)
    return p


# ---------------------------------------------------------------------- probe
def cmd_probe(args: argparse.Namespace) -> int:
    from .collect import load_tokenizer

    out = _output_file(args.out, args.force, "stores built on the old probe keep their copy")
    tok = load_tokenizer(args.tokenizer)
    parts = []
    for path in map(Path, args.inputs):
        kind, items = _read_probe_input(path, args.text_field)
        if kind == "pairs":
            parts.append(ProbeSet.from_pairs(items, tok, max_length=args.max_length, score_context=args.score_context))
        else:
            parts.append(ProbeSet.from_texts(items, tok, max_length=args.max_length))
    probe = ProbeSet.concat(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    probe.save(out)
    print(f"{out}: {probe.num_sequences} sequences, {probe.n_tokens} scored tokens "
          f"({int(probe.answer_mask.sum())} answer tokens), fingerprint {probe.fingerprint}, "
          f"tokenizer {probe.tokenizer_hash}")
    return 0


def _read_probe_input(path: Path, text_field: str) -> tuple[str, list]:
    """``("pairs", [dict])`` or ``("texts", [str])`` from a JSONL or plain-text file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such probe input file.")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); save it as UTF-8.") from None
    if path.suffix != ".jsonl":
        texts = [t.strip() for t in re.split(r"\n\s*\n", content) if t.strip()]
        return "texts", texts
    records = []
    for i, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}: not JSON ({e}).") from None
    is_pair = [isinstance(r, dict) and "context" in r and "continuation" in r for r in records]
    if all(is_pair) and records:
        return "pairs", records
    if any(is_pair):
        raise ValueError(f"{path} mixes pairs and texts; put pairs and texts in separate files.")
    bad = [
        i for i, r in enumerate(records, start=1) if not isinstance(r, dict) or not isinstance(r.get(text_field), str)
    ]
    if bad:
        raise ValueError(f"{path}: record {bad[0]} has no string field {text_field!r} and is not a "
                         "context/continuation pair; pass --text-field.")
    return "texts", [r[text_field] for r in records]


# ---------------------------------------------------------------------- collect
def cmd_collect(args: argparse.Namespace) -> int:
    import torch

    from .collect import check_loadable, check_tokenizers, collect, import_class, resolve_checkpoints, resolve_device

    # Everything that can fail is checked before a model is run; collect creates the store directory only once
    # the first checkpoint has scored the probe.
    out = _output_dir(args.out)
    checkpoints = resolve_checkpoints(args.checkpoints, name_parts=args.name_parts)
    module_class = import_class(args.module) if args.module else None
    if module_class is None and any(ck.kind == "lightning" for ck in checkpoints):
        raise ValueError(
            "Lightning .ckpt files need their LightningModule class: pass --module package.module:ClassName."
        )
    if args.probe:
        probe = ProbeSet.load(args.probe)
    elif (out / "probe.safetensors").is_file():
        probe = ProbeSet.load(out / "probe.safetensors")
    else:
        raise ValueError(f"{out} holds no probe yet; pass --probe probe.safetensors.")
    check_tokenizers(checkpoints, probe)
    check_loadable(checkpoints, trust_checkpoints=args.trust_checkpoints)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}.")
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    done = collect(checkpoints, probe, out, device, dtype, batch_size=args.batch_size, module_class=module_class,
                   trust_checkpoints=args.trust_checkpoints, progress=not args.no_progress)
    print(f"{out}: collected {len(done)} checkpoint(s), skipped {len(checkpoints) - len(done)} already stored; probe "
          f"{probe.fingerprint}, {probe.n_tokens} tokens, device {device}, {dtype}.")
    return 0


# ---------------------------------------------------------------------- fit
def cmd_fit(args: argparse.Namespace) -> int:
    from .fit_store import fit_from_store

    if args.loss_columns:
        return _fit_table(args)
    if args.lmeval is None and args.scores is None:
        raise ValueError("fit needs the checkpoints' scores: --lmeval PATH... or --scores CSV (or --loss-columns to "
                         "fit a domain vector from one table).")
    for root in map(Path, args.losses):  # even --force must not turn a store's own file into a vector
        target = Path(args.out).resolve()
        if target == (root / "probe.safetensors").resolve() or (root / "losses").resolve() in target.parents:
            raise ValueError(f"--out {args.out} is a file of the loss store {root}, which a vector would break; write "
                             f"it elsewhere, e.g. {root / (args.task + '.safetensors')}.")
    if args.trajectory_prior and len(args.losses) < 2:
        raise ValueError("--trajectory-prior learns how runs move to their end from several complete runs: pass at "
                         "least two loss stores (one save_dir per run).")
    out = _output_file(args.out, args.force)
    with _notes():
        sv = fit_from_store(args.losses, args.task, lmeval=args.lmeval, scores=args.scores, metric=args.metric,
                            filter=args.filter, mapping=args.mapping, score_column=args.score_column,
                            groups=args.groups, trajectory=args.trajectory_prior, n_folds=args.folds, seed=args.seed,
                            priors=args.priors, anchor=args.anchor, score_range=args.score_range)
    out.parent.mkdir(parents=True, exist_ok=True)
    sv.save(out)
    prior = sv.fit_report.get(PRIOR_KEY)
    print(f"{out}: {args.task} {args.metric} from {sv.fit_report['n_checkpoints']} checkpoints, probe "
          f"{sv.probe_fingerprint}, prior {sv.fit_report['prior']}, lambda {sv.fit_report['lam']:.3g}, "
          f"{sv.fit_report['effective_tokens']:.0f} effective tokens of {sv.n_tokens}"
          + (f", trajectory prior of {len(prior['runs'])} runs" if prior else ""))
    print(format_cv_table(sv.fit_report))
    return 0


def _fit_table(args: argparse.Namespace) -> int:
    """``fit TABLE.csv --loss-columns ...``: a domain vector from one table."""
    from .fit_table import fit_from_table

    given = [flag for flag, value in (("--lmeval", args.lmeval), ("--scores", args.scores), ("--mapping", args.mapping),
                                      ("--trajectory-prior", args.trajectory_prior), ("--priors", args.priors))
             if value]
    if given or args.filter != "none":
        raise ValueError(f"--loss-columns fits a domain vector from the table alone; {given or ['--filter']} belong to "
                         "fitting from loss stores.")
    if len(args.losses) != 1 or not Path(args.losses[0]).is_file():
        raise ValueError(f"--loss-columns reads one CSV table, got {args.losses}; pass the table's path.")
    out = _output_file(args.out, args.force)
    with _notes():
        sv = fit_from_table(args.losses[0], args.task, args.loss_columns, args.score_column, groups=args.groups,
                            metric=args.metric, n_folds=args.folds, seed=args.seed, anchor=args.anchor,
                            score_range=args.score_range)
    out.parent.mkdir(parents=True, exist_ok=True)
    sv.save(out)
    print(f"{out}: {args.task} {args.metric} from {sv.fit_report['n_checkpoints']} checkpoints, domain vector over "
          f"{len(sv.domains)} domains {list(sv.domains)}, lambda {sv.fit_report['lam']:.3g}, best single domain "
          f"{sv.fit_report['best_domain']}")
    print(format_cv_table(sv.fit_report))
    return 0


def format_cv_table(report: dict[str, Any]) -> str:
    """The cross-validation table of a fit report: one row per method, MSE and MAE, best MSE marked."""
    mse, mae = report["cv_mse"], report["cv_mae"]
    methods = [m for m in ("csv", "uniform", "label", "domain") if m in mse]
    best = min(methods, key=mse.get)
    lines = [
        f"cross-validation ({report['cv']} folds, {len(set(report['folds']))} folds, {report['n_checkpoints']} "
        f"checkpoints)",
        f"{'method':<10}{'MSE':>12}{'MAE':>10}",
    ]
    for method in methods:
        lines.append(f"{method:<10}{mse[method]:>12.3g}{mae[method]:>10.3g}{'  <- best' if method == best else ''}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    vectors = _load_vectors(args.vectors)
    table = load_losses(args.losses)
    records = predictions(table, vectors, args.level)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    labels = _column_labels(vectors)
    widths = [max(10, len(label)) for label in labels]
    header = "".join(f"  {label:>{w}}  extrapolating" for label, w in zip(labels, widths))
    print(f"{'checkpoint':<32}{'step':>8}{header}")
    per_row = len(vectors)
    for i, name in enumerate(table.names):
        row = records[i * per_row:(i + 1) * per_row]
        cells = "".join(
            f"  {r['pred']:>{w}.4f}  {'yes' if r['extrapolating'] else 'no':>13}" for r, w in zip(row, widths)
        )
        print(f"{name[:31]:<32}{int(table.steps[i]):>8}{cells}")
    if any(r["extrapolating"] for r in records):
        print(
            "extrapolating yes: the weighted loss is outside the range seen in fitting; treat that prediction with "
            "care."
        )
    return 0


def _column_labels(vectors: dict[str, SalienceVector]) -> list[str]:
    """One header per vector: its task, with its file when another vector has the same task."""
    tasks = [sv.task for sv in vectors.values()]
    return [t if tasks.count(t) == 1 else f"{t} ({path})" for t, path in zip(tasks, vectors)]


def predictions(table: LossTable, vectors: dict[str, SalienceVector], level: float = 0.8) -> list[dict[str, Any]]:
    """One record per (checkpoint, vector), checkpoint-major: predicted score, its interval at ``level``
    (``pred_lo``, ``pred_hi``: :meth:`SalienceVector.interval`), weighted loss and ``extrapolating`` (the names of
    the callbacks' metrics), for ``vectors`` keyed by their file."""
    level = check_level(level, "--level")
    out = []
    per_vector = []
    for path, sv in vectors.items():
        wl = np.asarray(sv.weighted_loss(table.losses, table.fingerprint))
        lo, hi = sv.interval(wl, level)
        per_vector.append((path, sv, wl, np.asarray(sv.link(wl)), lo, hi, np.asarray(sv.extrapolates(wl))))
    for i, name in enumerate(table.names):
        for path, sv, wl, pred, lo, hi, extra in per_vector:
            out.append({"checkpoint": name, "step": int(table.steps[i]),
                        "tokens_seen": None if np.isnan(table.tokens_seen[i]) else float(table.tokens_seen[i]),
                        "vector": path, "task": sv.task, "metric": sv.metric, "pred": float(pred[i]),
                        "pred_lo": _no_nan(lo[i]), "pred_hi": _no_nan(hi[i]), "weighted_loss": float(wl[i]),
                        "extrapolating": bool(extra[i])})
    return out


def _no_nan(x: float) -> float | None:
    """``x``, or None (JSON null, not the non-standard NaN) for a vector without an interval."""
    return None if np.isnan(x) else float(x)


# ---------------------------------------------------------------------- forecast
def cmd_forecast(args: argparse.Namespace) -> int:
    if args.end < 1:
        raise ValueError(f"--end must be a positive training step (the run's planned end), got {args.end}.")
    vectors = _load_vectors(args.vectors)
    table = load_losses(args.losses)
    for path, sv in vectors.items():
        if PRIOR_KEY not in sv.fit_report:
            print(f"note: {path} carries no trajectory prior, so its forecasts follow the run's own trend alone; fit "
                  "it with --trajectory-prior on complete runs of the same schedule.", file=sys.stderr)
    with _notes():
        records = forecasts(table, vectors, args.end, args.level)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    labels = _column_labels(vectors)
    widths = [max(10, len(label)) for label in labels]
    print(f"score at step {args.end} forecast at each training evaluation (now: the prediction at that step; lo, hi: "
          f"the {args.level:g} interval)")
    header = "".join(f"  {label:>{w}}  {'now':>7}  {'lo':>7}  {'hi':>7}" for label, w in zip(labels, widths))
    print(f"{'checkpoint':<32}{'step':>8}{header}")
    per_row = len(vectors)
    for i in range(0, len(records), per_row):
        row = records[i:i + per_row]
        cells = "".join(f"  {r['forecast']:>{w}.4f}  {r['pred']:>7.4f}  {r['forecast_lo']:>7.4f}  "
                        f"{r['forecast_hi']:>7.4f}" for r, w in zip(row, widths))
        print(f"{row[0]['checkpoint'][:31]:<32}{row[0]['step']:>8}{cells}")
    return 0


def forecasts(
    table: LossTable, vectors: dict[str, SalienceVector], end: int, level: float = 0.8
) -> list[dict[str, Any]]:
    """One record per (training evaluation, vector), in step order: the :func:`predictions` record of the evaluation
    plus ``end_step`` and ``forecast``, ``forecast_lo``, ``forecast_hi`` (the callbacks' metrics): the score at step
    ``end`` forecast from the evaluations up to it (:func:`~csv_callback.forecast.running_forecast`).

    The training evaluations of ``table`` (one run's store) are its checkpoints named ``step-<N>`` at steps > 0, as
    the callbacks save them; ``end`` must lie beyond the first of them."""
    training = [i for i, name in enumerate(table.names) if name.startswith("step-") and table.steps[i] != 0]
    unknown = [table.names[i] for i in training if table.steps[i] < 0]
    if unknown:
        raise ValueError(f"checkpoint(s) {unknown[:5]} record no training step (-1), so where they lie in the run is "
                         "unknown; forecast reads a training run's save_dir, whose evaluations record their step.")
    if not training:
        raise ValueError(f"the store holds no training evaluations (checkpoints named step-<N> at steps > 0, as "
                         f"SalienceCallback(save_dir=...) saves them), only {table.names[:5]}; pass one training "
                         "run's save_dir.")
    steps = table.steps[training]
    if (np.diff(steps) == 0).any():
        at = int(steps[1:][np.diff(steps) == 0][0])
        names = [table.names[i] for i in training if table.steps[i] == at]
        raise ValueError(f"several checkpoints record step {at} ({names}); one run evaluates each step once: pass one "
                         "run's save_dir.")
    first = int(steps[0])
    if not isinstance(end, int) or isinstance(end, bool) or end <= first:
        raise ValueError(f"--end must be a training step beyond the run's first evaluation (step {first}), the step "
                         f"whose score is forecast, got {end!r}.")
    run = replace(table, losses=table.losses[training], names=[table.names[i] for i in training],
                  steps=steps, tokens_seen=table.tokens_seen[training],
                  extra=[table.extra[i] for i in training] if table.extra else [])
    records = predictions(run, vectors, level)
    per_vector = [[r["weighted_loss"] for r in records[k::len(vectors)]] for k in range(len(vectors))]
    for j, r in enumerate(records):
        k, i = j % len(vectors), j // len(vectors)
        forecast = running_forecast(run.steps[: i + 1], per_vector[k][: i + 1], end, vectors[r["vector"]], level)
        r.update(end_step=end, **dict(zip(("forecast", "forecast_lo", "forecast_hi"), map(_no_nan, forecast))))
    return records


def _load_vectors(paths: list[str]) -> dict[str, SalienceVector]:
    """The vectors of ``paths``, keyed by their file; a file given twice is an error."""
    twice = sorted({v for v in paths if paths.count(v) > 1})
    if twice:
        raise ValueError(f"vector {twice[0]} is given twice; name each vector once.")
    return {v: SalienceVector.load(v) for v in paths}


@contextmanager
def _notes() -> Iterator[None]:
    """Print the warnings raised inside as ``note: ...`` lines on stderr, once each: a command's output is its
    table, and what it noticed on the way goes beside it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"note: {message}", file=sys.stderr)


# ---------------------------------------------------------------------- scaling
def cmd_scaling(args: argparse.Namespace) -> int:
    from .scaling import fit_scaling_law, predict_score

    level = check_level(args.level, "--level")
    target = (args.target_params, args.target_tokens)
    if not all(np.isfinite(target)) or min(target) <= 0:
        raise ValueError(f"--target-params and --target-tokens must be positive numbers, got {target}.")
    plot = _output_file(args.plot, force=True) if args.plot else None
    sv = SalienceVector.load(args.vector)
    points = scaling_points(args.stores, sv, args.final_only)
    N, D, L = (np.array([p[k] for p in points]) for k in ("params", "tokens_seen", "weighted_loss"))
    if len(points) < 5:
        raise ValueError(f"a scaling law has 5 parameters, but only {len(points)} checkpoint(s) were found"
                         + (" with --final-only (one per store)" if args.final_only else "")
                         + "; pass more runs' stores" + ("" if args.final_only else " or more checkpoints") + ".")
    law = fit_scaling_law(N, D, L)
    loss = float(law.predict(*target))
    loss_lo, loss_hi = law.interval(*target, level)
    score, score_lo, score_hi = predict_score(law, sv, *target, level)
    result = {"law": law.to_dict(), "vector": args.vector, "task": sv.task, "metric": sv.metric,
              "final_only": args.final_only, "level": level, "points": points,
              "target": {"params": target[0], "tokens": target[1], "weighted_loss": loss, "weighted_loss_lo": loss_lo,
                         "weighted_loss_hi": loss_hi, "score": score, "score_lo": _no_nan(score_lo),
                         "score_hi": _no_nan(score_hi)}}
    if plot is not None:
        plot_scaling(law, points, result["target"], plot)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    sizes = ", ".join(f"{n:.4g}" for n in np.unique(N))
    print(f"{law}\nfitted to {len(points)} {'final checkpoints' if args.final_only else 'checkpoints'} of "
          f"{len({p['store'] for p in points})} store(s); N = {sizes}; D = {D.min():.4g} .. {D.max():.4g}")
    print(f"at N = {target[0]:.4g}, D = {target[1]:.4g} ({level:g} intervals):")
    print(f"  weighted loss {loss:.4f}  [{loss_lo:.4f}, {loss_hi:.4f}]")
    print(f"  {sv.task} {sv.metric} {score:.4f}  [{score_lo:.4f}, {score_hi:.4f}]")
    if plot is not None:
        print(f"plot: {plot}")
    return 0


def scaling_points(stores: Sequence[str], sv: SalienceVector, final_only: bool = False) -> list[dict[str, Any]]:
    """One record per checkpoint of ``stores`` (each store's last by step with ``final_only``): ``store``,
    ``checkpoint``, ``step``, ``params`` (N), ``tokens_seen`` (D) and ``sv``'s ``weighted_loss``. Checkpoints at
    ``tokens_seen == 0`` (an evaluation before training) are left out: the law is infinite there."""
    twice = sorted({s for s in stores if list(map(os.path.realpath, stores)).count(os.path.realpath(s)) > 1})
    if twice:
        raise ValueError(f"store {twice[0]} is given twice; name each run's store once.")
    out = []
    for store in stores:
        table = load_losses(store)
        wl = np.asarray(sv.weighted_loss(table.losses, table.fingerprint), dtype=np.float64).reshape(-1)
        unknown = [table.names[i] for i in range(len(wl))
                   if np.isnan(table.params[i]) or np.isnan(table.tokens_seen[i])]
        if unknown:
            raise ValueError(
                f"{store}: checkpoint(s) {unknown[:3]} record no parameter count or no tokens seen, which the law is "
                "fitted on (N and D). The callbacks record both with every evaluation: SalienceCallback counts "
                "tokens in the LightningModule attribute tokens_seen_attr, SalienceTrainerCallback needs "
                "TrainingArguments(include_num_input_tokens_seen=True); for older stores re-collect the losses from "
                "the checkpoints, or write them again with LossStore.write(..., tokens_seen=D, params=N).")
        rows = [i for i in range(len(wl)) if table.tokens_seen[i] > 0]
        if final_only:
            rows = rows[-1:]  # load_losses sorts a store's rows by step
        out += [{"store": str(store), "checkpoint": table.names[i], "step": int(table.steps[i]),
                 "params": float(table.params[i]), "tokens_seen": float(table.tokens_seen[i]),
                 "weighted_loss": float(wl[i])} for i in rows]
    return out


def plot_scaling(law: Any, points: list[dict[str, Any]], target: dict[str, Any], path: Path) -> None:
    """Weighted loss against D (log axis), one colour per N: the points, the law's curve for each N and for the
    target's N, and the target's predicted loss with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    D = np.array([p["tokens_seen"] for p in points])
    grid = np.geomspace(D.min(), max(D.max(), target["tokens"]), 200)
    sizes = sorted({p["params"] for p in points})
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(sizes)))
    for n, c in zip(sizes, colours):
        mine = [p for p in points if p["params"] == n]
        ax.scatter([p["tokens_seen"] for p in mine], [p["weighted_loss"] for p in mine], color=c, s=16,
                   label=f"N = {n:.3g}")
        ax.plot(grid, law.predict(n, grid), color=c, lw=1)
    ax.plot(grid, law.predict(target["params"], grid), "k--", lw=1, label=f"law at N = {target['params']:.3g}")
    lo, hi = target["weighted_loss_lo"], target["weighted_loss_hi"]
    ax.errorbar([target["tokens"]], [target["weighted_loss"]], yerr=[[target["weighted_loss"] - lo],
                [hi - target["weighted_loss"]]], fmt="k*", ms=10, capsize=4, label="target (interval)")
    ax.set(xscale="log", xlabel="tokens seen (D)", ylabel="weighted loss", title=str(law).split("  (")[0])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = _output_dir(args.out)
    sv = SalienceVector.load(args.vector)
    probe = None
    if args.probe:
        probe = ProbeSet.load(args.probe)
    elif args.losses:
        probe = LossStore(args.losses).probe()
    table = load_losses(args.losses, sv.probe_fingerprint or None) if args.losses else None
    tokenizer = None
    if args.tokenizer:
        from .collect import load_tokenizer

        if probe is None:
            raise ValueError(
                "--tokenizer decodes the probe's tokens, but there is no probe: pass --losses or --probe too."
            )
        tokenizer = load_tokenizer(args.tokenizer)
        try:
            probe.check_tokenizer(tokenizer)  # another vocabulary would show the salience on the wrong words
        except ProbeMismatchError as e:
            raise ProbeMismatchError(f"--tokenizer {args.tokenizer}: {e}") from None
    index = write_report(sv, out, probe=probe, table=table, tokenizer=tokenizer, top=args.top)
    print(f"{index}")
    return 0


# ---------------------------------------------------------------------- output paths
def _output_file(path: str, force: bool, kept: str = "") -> Path:
    """``--out`` as a file to write, refused (before any work) if it is a directory, cannot be created, or exists
    and ``force`` is False. ``kept`` says what survives an overwrite."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file path, e.g. {out / 'out.safetensors'}.")
    if out.exists() and not force:
        raise ValueError(f"{out} exists; pass --force to overwrite it{f' ({kept})' if kept else ''}.")
    _check_creatable(out, out.parent)
    return out


def _output_dir(path: str) -> Path:
    """``--out`` as a directory to write into (created if missing), refused if it is a file or cannot be created."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (it is created if missing).")
    _check_creatable(out, out)
    return out


def _check_creatable(out: Path, directory: Path) -> None:
    """Raise unless ``directory`` (that ``out`` is written into) is, or can be created as, a writable directory."""
    here = directory.absolute()
    existing = next(p for p in (here, *here.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so nothing can be created below it; choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write to {existing} (permission denied); choose another path.")


if __name__ == "__main__":
    sys.exit(main())
