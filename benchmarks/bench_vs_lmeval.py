"""What a validation's prediction costs against the evaluation it replaces: the demo's model and tasks.

    PYTHONPATH=. nice -n 0 python benchmarks/bench_vs_lmeval.py [--repeats 7] [--json out.json]

Builds the demo's model (examples/train_tiny_lm.py: the ladder's GPT-2 ``s3``, its locally trained tokenizer,
the demo's data mixture), trains it for ``--train-steps`` steps (timing does not depend on accuracy), then
times, interleaved over ``--repeats`` rounds whose order alternates, after one untimed warm-up of each:

  * ``csv``: one validation's evaluation as the demo's :class:`SalienceCallback` does it, by a
    :class:`SalienceEvaluator` built once from the shipped vectors and probe (batch size 32, a loss store):
    ``evaluate(model, step, training=True)`` at a new step each time, so nothing is reused from the last
    call (the weights checksum, the probe's forward, the predictions, the store's atomic write);
  * ``csv_cold``: ``SalienceEvaluator(vectors, probe, batch_size=32).evaluate(model, step)``, loading the
    vectors and the probe from their files every time (no store): an evaluation with nothing prepared;
  * ``lmeval``: one run of real lm-eval-harness on the three tasks exactly as the demo runs them
    (``LmEvalAccuracy.measure``: ``HFLM(pretrained=<in-memory model>)`` + ``simple_evaluate``, the
    local YAML + JSONL tasks).

Prints medians, the ratio lm-eval / evaluator of the medians and the median of the per-round ratios, how much
of each warm-up was the model's forwards (timed with hooks), the 1-minute load average at the start and the
end, torch threads and versions. The machine may be shared: absolute times are noisy, the ratios are what count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Before the demo's imports, as the demo does when run as a script: tqdm reads its defaults on import, and
# lm-eval's and datasets' progress bars would otherwise be drawn (and timed) in every lm-eval run.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import lightning.pytorch as pl
import torch
import train_tiny_lm as demo

from csv_callback import ProbeSet
from csv_callback.evaluator import SalienceEvaluator

PROBE = demo.ASSETS / "probe.safetensors"
BATCH_SIZE = 32  # the demo's SalienceCallback(batch_size=32)


def build_model(size: str, steps: int) -> tuple[demo.LadderLM, demo.World]:
    """The demo's LightningModule and world, trained ``steps`` steps on the demo's mixture (seed 1)."""
    world = demo.World()
    module = demo.LadderLM(size, world, world.token_stream(demo.DEMO_MIXTURE, seed=1), world.validation_windows(),
                           [steps], seed=1)
    pl.Trainer(max_epochs=1, max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               limit_val_batches=0).fit(module)
    return module, world


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def timed_with_forwards(fn: Callable[[], object], model: torch.nn.Module) -> tuple[float, float, int]:
    """(wall seconds of ``fn()``, seconds inside ``model``'s forward, forward calls): what is not the model."""
    inside = {"seconds": 0.0, "calls": 0, "start": 0.0}

    def pre(*_: object) -> None:
        inside["start"] = time.perf_counter()

    def post(*_: object) -> None:
        inside["seconds"] += time.perf_counter() - inside["start"]
        inside["calls"] += 1

    hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        wall = timed(fn)[0]
    finally:
        for h in hooks:
            h.remove()
    return wall, inside["seconds"], inside["calls"]


def versions() -> dict[str, str]:
    import lightning
    import lm_eval
    import transformers

    import csv_callback

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": lm_eval.__version__, "lightning": lightning.__version__,
            "csv_callback": getattr(csv_callback, "__version__", "?")}


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    return next((ln.split(":", 1)[1].strip() for ln in out if ln.startswith("Model name")), platform.processor())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (>= 5), order alternating")
    ap.add_argument("--size", default="s3", choices=list(demo.SIZES), help="the ladder size (the demo's default: s3)")
    ap.add_argument("--train-steps", type=int, default=100, help="training steps before timing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo's default: 1)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.repeats < 5 or args.train_steps < 1 or args.threads < 1:
        ap.error("need --repeats >= 5, --train-steps >= 1 and --threads >= 1.")
    demo.quiet_libraries()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    module, world = build_model(args.size, args.train_steps)
    model = module.model
    vectors = sorted(demo.ASSETS.glob("ladder_*.safetensors"))
    probe = ProbeSet.load(PROBE)
    docs = {t: world.questions(t) for t in demo.TASKS}
    questions = {t: len(d) for t, d in docs.items()}
    requests = sum(len(q["choices"]) for d in docs.values() for q in d)  # one log-likelihood per choice
    with tempfile.TemporaryDirectory() as tmp:
        measure = demo.LmEvalAccuracy(world, Path(tmp) / "tasks", every=1)
        evaluator = SalienceEvaluator(vectors, PROBE, batch_size=BATCH_SIZE, save_dir=Path(tmp) / "probe_losses")
        evaluator.open_store()  # the callback opens it when fit starts, not in a validation
        step = args.train_steps

        def csv() -> dict[str, float]:
            nonlocal step
            step += 1  # a new validation point: nothing of the previous call is reused
            return evaluator.evaluate(model, step, training=True).metrics

        def csv_cold() -> dict[str, float]:
            return SalienceEvaluator(vectors, PROBE, batch_size=BATCH_SIZE).evaluate(model, step).metrics

        def lmeval() -> dict[str, float]:
            return measure.measure(model, "cpu")

        kinds = {"csv": csv, "csv_cold": csv_cold, "lmeval": lmeval}
        # The warm-up also splits each kind's time into the model's forwards and the rest (hooks cost a
        # little, so the timed rounds run without them).
        warmup = {k: timed_with_forwards(fn, model) for k, fn in kinds.items()}
        seconds: dict[str, list[float]] = {k: [] for k in kinds}
        last: dict[str, object] = {}
        for r in range(args.repeats):
            for k in list(kinds) if r % 2 == 0 else list(kinds)[::-1]:
                s, last[k] = timed(kinds[k])
                seconds[k].append(s)
            print(f"  round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in seconds.items()),
                  flush=True)

    med = statistics.median
    ours = ("csv", "csv_cold")
    ratio = {k: med(seconds["lmeval"]) / med(seconds[k]) for k in ours}
    per_round = {k: med(lm / c for lm, c in zip(seconds["lmeval"], seconds[k], strict=True)) for k in ours}
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": started,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0]},
        "versions": versions(),
        "model": {"size": args.size, "params": sum(p.numel() for p in model.parameters()),
                  "train_steps": args.train_steps},
        "csv": {"probe_sequences": probe.num_sequences, "probe_scored_tokens": probe.n_tokens,
                "vectors": [v.name for v in vectors], "batch_size": BATCH_SIZE,
                "pred": {t: last["csv"][f"csv/{t}/pred"] for t in demo.TASKS}},
        "lmeval": {"questions": questions, "loglikelihood_requests": requests, "acc": last["lmeval"]},
        "warmup_seconds": {k: w[0] for k, w in warmup.items()},
        "warmup_forward_seconds": {k: w[1] for k, w in warmup.items()},
        "warmup_forward_calls": {k: w[2] for k, w in warmup.items()},
        "seconds": seconds,
        "median_seconds": {k: med(v) for k, v in seconds.items()},
        "ratio_lmeval_over": ratio,
        "ratio_lmeval_over_per_round_median": per_round,
    }
    m = result["machine"]
    print(f"GPT-2 {args.size} ({result['model']['params']:,} parameters, {args.train_steps} steps); "
          f"probe {probe.num_sequences} sequences / {probe.n_tokens} scored tokens; lm-eval "
          f"{sum(questions.values())} questions ({', '.join(f'{t} {n}' for t, n in questions.items())}), "
          f"{requests} log-likelihood requests")
    print("warm-up: " + ", ".join(f"{k} {w:.3f} s, of which {f:.3f} s in {n} model forwards"
                                   for k, (w, f, n) in warmup.items()))
    for k in kinds:
        print(f"{k:>8}: median {med(seconds[k]):7.3f} s over {args.repeats} rounds")
    for k in ours:
        print(f"lm-eval / {k}: {ratio[k]:.1f}x (medians), {per_round[k]:.1f}x (per-round median)")
    print(f"predicted {result['csv']['pred']}; lm-eval measured {result['lmeval']['acc']}")
    print(f"{m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load (1 min) "
          f"{m['loadavg_1min_start']:.2f} -> {m['loadavg_1min_end']:.2f}; {result['versions']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
