"""Predict benchmark accuracies from the validation losses a run already logs: domain vectors, no probe, no extra
forward pass.

    python examples/domain_vectors.py            # about a minute on one CPU core; CSV logs under domain_run/

The demo's GPT-2 (``train_tiny_lm.py``: the ladder's world, tokenizer and an unseen data mixture) trains with four
validation dataloaders, one per domain: held-out general text and fresh lines of each capability source (facts,
arith, pattern). ``validation_step`` logs each domain's mean token loss as ``val/<domain>/loss``, and
:class:`SalienceCallback` with the domain vectors of ``examples/assets/domain_ladder_<source>.safetensors``
(fitted by ``benchmarks/ladder/domains.py`` on the ladder's 324 checkpoints) turns those four numbers into each
task's predicted accuracy after every validation. At the end lm-eval-harness measures the accuracies once, next
to the final predictions. Needs the ``lmeval`` extra.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    # As in train_tiny_lm.py: set before the imports that read them (tqdm's defaults, transformers' verbosity).
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks" / "ladder"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from train import SIZES, LadderLM  # noqa: E402
from train_tiny_lm import ASSETS, DEMO_MIXTURE, LmEvalAccuracy, describe, quiet_libraries  # noqa: E402
from world import DOMAINS, SOURCES, TASKS, World, line_probe  # noqa: E402

from csv_callback import ProbeSet  # noqa: E402
from csv_callback.callback import SalienceCallback  # noqa: E402

VECTORS = [ASSETS / f"domain_ladder_{source}.safetensors" for source in SOURCES]
DOMAIN_METRICS = {domain: f"val/{domain}/loss" for domain in DOMAINS}
# Fresh capability lines for validation: the demo trains on seed 1's lines, the probe's come from seed 1000 and the
# task questions from 2000 + k, so these (3000 + k) are none of them.
VALIDATION_SEED = 3000
VALIDATION_LINES = 64


def validation_sets(world: World) -> dict[str, dict[str, torch.Tensor]]:
    """Per domain of ``DOMAINS``, one batch ``{"input_ids", "attention_mask", "labels"}`` (int64 ``[b, t]``).

    "general" is :meth:`World.validation_windows` (every token after a window's first scored). Each source is
    ``VALIDATION_LINES`` fresh lines, one line per row, right-padded, scored as the ladder's probe scores its lines
    (:func:`world.line_probe`: every token after the first): so the logged loss of a domain is the same quantity the
    domain vectors were fitted on, the mean token loss over that domain's segment of the probe.
    """
    windows = world.validation_windows()
    sets = {"general": {"input_ids": windows, "attention_mask": torch.ones_like(windows), "labels": windows}}
    for k, source in enumerate(SOURCES):
        rng = random.Random(VALIDATION_SEED + k)
        sets[source] = padded(line_probe([world.line(source, rng) for _ in range(VALIDATION_LINES)], world.tokenizer))
    return sets


def padded(probe: ProbeSet) -> dict[str, torch.Tensor]:
    """The probe's sequences as one right-padded batch; ``labels`` are the tokens the probe scores, -100 elsewhere."""
    width = int(probe.lengths.max())
    ids = torch.zeros(probe.num_sequences, width, dtype=torch.int64)
    labels = torch.full_like(ids, -100)
    for i in range(probe.num_sequences):
        lo, hi = int(probe.offsets[i]), int(probe.offsets[i + 1])
        ids[i, : hi - lo] = probe.input_ids[lo:hi]
        labels[i, : hi - lo] = probe.input_ids[lo:hi].masked_fill(~probe.score_mask[lo:hi], -100)
    return {"input_ids": ids, "attention_mask": (torch.arange(width) < probe.lengths[:, None]).long(), "labels": labels}


class DomainLM(LadderLM):
    """The demo's model, validated on one dataloader per domain, each logging ``val/<domain>/loss``."""

    def __init__(self, size: str, world: World, stream: torch.Tensor, steps: list[int], seed: int) -> None:
        self.domain_sets = validation_sets(world)
        super().__init__(size, world, stream, self.domain_sets["general"]["input_ids"], steps, seed)

    def val_dataloader(self) -> list[DataLoader]:
        # One batch per domain (batch_size=None: the batch as built), so the epoch mean is the domain's token mean.
        return [DataLoader([self.domain_sets[d]], batch_size=None) for d in DOMAINS]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = self.model(**batch).loss
        self.log(DOMAIN_METRICS[DOMAINS[dataloader_idx]], loss, add_dataloader_idx=False,
                 batch_size=len(batch["input_ids"]))


class PrintPredictions(pl.Callback):
    """One console line per validation: the domain losses the loop logged and the accuracies predicted from them.

    Placed after the :class:`SalienceCallback` in the Trainer's callbacks, so this validation's predictions are in
    its history; ``rows`` keeps ``{"step", "losses": {domain: loss}, "pred": {task: pred}}`` per validation.
    """

    def __init__(self, predict: SalienceCallback, start: float) -> None:
        self.predict, self.start = predict, start
        self.rows: list[dict] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: DomainLM) -> None:
        if trainer.sanity_checking:
            return
        step, last = trainer.global_step, trainer.max_steps
        losses = {d: float(trainer.callback_metrics[m]) for d, m in DOMAIN_METRICS.items()}
        pred = {r["task"]: r["pred"] for r in self.predict.history if r["step"] == step}
        self.rows.append({"step": step, "losses": losses, "pred": pred})
        print(f"  step {step:>{len(str(last))}}/{last} {time.time() - self.start:5.0f} s  loss "
              + " ".join(f"{d} {v:.3f}" for d, v in losses.items()) + "  -> predicted "
              + " ".join(f"{t.removeprefix('ladder_')} {pred[t]:.3f}" for t in TASKS), flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("domain_run"), help="directory for the CSV logs and lm-eval tasks")
    ap.add_argument("--size", default="s3", choices=list(SIZES), help="model size of the ladder")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--val-every", type=int, default=200, help="training steps between validations")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for this model)")
    args = ap.parse_args(argv)
    if args.steps < args.val_every or args.val_every < 1 or args.threads < 1:
        ap.error("need --steps >= --val-every >= 1 and --threads >= 1.")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    world = World()
    steps = list(range(args.val_every, args.steps + 1, args.val_every))
    module = DomainLM(args.size, world, world.token_stream(DEMO_MIXTURE, seed=1), steps, seed=1)
    predict = SalienceCallback(VECTORS, probe=None, domain_metrics=DOMAIN_METRICS)
    show = PrintPredictions(predict, t0)
    lmeval = LmEvalAccuracy(world, args.out / "tasks", every=1)  # measured once, after training
    logger = pl.loggers.CSVLogger(str(args.out), name="csv")
    trainer = pl.Trainer(max_epochs=len(steps), max_steps=steps[-1], accelerator="cpu", devices=1, logger=logger,
                         callbacks=[predict, show], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1,
                         log_every_n_steps=50, default_root_dir=str(args.out))
    print(f"Training GPT-2 {args.size} for {steps[-1]} steps on {describe(DEMO_MIXTURE)}.\nValidating on "
          f"{', '.join(DOMAINS)} every {args.val_every} steps; the domain vectors predict "
          f"{', '.join(t.removeprefix('ladder_') for t in TASKS)} accuracy from those four losses alone.", flush=True)
    trainer.fit(module)

    start = time.perf_counter()
    measured = lmeval.measure(module.model)
    final = show.rows[-1]
    print(f"lm-eval-harness at step {final['step']} ({time.perf_counter() - start:.0f} s):  "
          + "  ".join(f"{t.removeprefix('ladder_')} {measured[t]:.3f} (predicted {final['pred'][t]:.3f})"
                      for t in TASKS))
    print(f"done in {time.time() - t0:.0f} s; logs: {logger.log_dir}/metrics.csv", flush=True)
    return {"rows": show.rows, "history": predict.history, "measured": measured, "log_dir": logger.log_dir,
            "model": module.model, "validation_sets": module.domain_sets}


if __name__ == "__main__":
    quiet_libraries()
    main()
