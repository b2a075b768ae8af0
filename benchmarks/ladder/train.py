"""Train the ladder: tiny GPT-2 sizes x data mixtures, probe losses and task scores at log-spaced checkpoints.

Each run trains with Lightning on random windows of its mixture's token stream. The training is cut into one
epoch per checkpoint (epoch k ends at the k-th log-spaced step), and Lightning validates at the end of each
epoch, which is where the library's :class:`~csv_callback.SalienceCallback` (no vectors yet, ``save_dir`` set)
stores the probe's per-token losses, as it would in a user's run. A second callback plays the part of
lm-eval-harness: it scores the checkpoint's task accuracies in-process with :class:`world.TaskScorer`
(tests/test_ladder_scorer.py checks it against lm-eval itself) and writes them as an lm-eval results file
(``results[task]["acc,none"]``).

Layout under ``--out`` (default ``benchmarks/ladder/data``)::

    probe.safetensors  model/ (one saved checkpoint, for the scorer test)
    runs/<size>-<mixture>/losses/...       the callback's LossStore, rows named step-<step:09d>
    runs/<size>-<mixture>/lmeval/step-<step:09d>/results_step-<step:09d>.json
    runs/<size>-<mixture>/run.json         wall time, steps, losses and accuracies per checkpoint

    PYTHONPATH=/work/main python benchmarks/ladder/train.py [--jobs 2] [--sizes s1 ...] [--mixtures general ...]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl
from torch.utils.data import DataLoader, IterableDataset
from world import MAX_LENGTH, MIXTURES, Mixture, TaskScorer, World, results_document

from csv_callback.callback import SalienceCallback
from csv_callback.testing import tiny_gpt2

# (n_layer, n_embd) per size; tiny_gpt2 uses 2 heads. The ladder is s1-s4; s5 (867k parameters) is trained only
# when asked for (--sizes s5): its nine runs cost more CPU than the ladder's 36 together (BENCHMARKS.md, "A fifth
# size").
SIZES = {"s1": (1, 32), "s2": (2, 48), "s3": (2, 64), "s4": (3, 96), "s5": (4, 128)}
LADDER_SIZES = ["s1", "s2", "s3", "s4"]
STEPS = 2000
BATCH = 16
LR_AT_64 = 3e-3  # peak learning rate of the 64-wide model; scaled by (64 / width) ** 0.5 for the others
WARMUP = 30
N_CHECKPOINTS = 9
FIRST_CHECKPOINT = 10
SAVED_MODEL_RUN = ("s1", "capable")  # its last checkpoint (well above chance) is saved for tests/test_ladder_scorer.py


def checkpoint_steps(steps: int = STEPS, n: int = N_CHECKPOINTS, first: int = FIRST_CHECKPOINT) -> list[int]:
    """Log-spaced steps from ``first`` to ``steps`` (distinct ints)."""
    return sorted(set(np.geomspace(first, steps, n).round().astype(int).tolist()))


class Windows(IterableDataset):
    """``count`` random ``[MAX_LENGTH]`` windows of a token stream (nanoGPT-style), seeded."""

    def __init__(self, stream: torch.Tensor, count: int, seed: int) -> None:
        self.stream, self.count, self.seed = stream, count, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for start in torch.randint(0, len(self.stream) - MAX_LENGTH, (self.count,), generator=g).tolist():
            yield self.stream[start : start + MAX_LENGTH]


class LadderLM(pl.LightningModule):
    """A tiny HF GPT-2 (``self.model``) trained on next-token loss, one epoch per checkpoint interval.

    Keeps ``tokenizer`` and ``tokens_seen`` where :class:`SalienceCallback` looks for them (it checks the
    tokenizer against the probe, and stores the token count with the losses).
    """

    def __init__(
        self, size: str, world: World, stream: torch.Tensor, val: torch.Tensor, steps: list[int], seed: int
    ) -> None:
        super().__init__()
        n_layer, n_embd = SIZES[size]
        self.model = tiny_gpt2(len(world.tokenizer), n_positions=MAX_LENGTH, n_layer=n_layer, n_embd=n_embd, seed=seed)
        self.tokenizer = world.tokenizer
        self.lr = LR_AT_64 * math.sqrt(64 / n_embd)
        self.stream, self.val, self.steps, self.seed = stream, val, steps, seed
        self.tokens_seen = 0

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        n_batches = self.steps[epoch] - (self.steps[epoch - 1] if epoch else 0)
        return DataLoader(Windows(self.stream, n_batches * BATCH, seed=self.seed * 1000 + epoch), batch_size=BATCH)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=len(self.val))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.tokens_seen += batch.numel()
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        total = self.steps[-1]

        def schedule(step: int) -> float:  # linear warm-up, then cosine decay to a tenth
            if step < WARMUP:
                return (step + 1) / WARMUP
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - WARMUP) / max(1, total - WARMUP))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                                   "interval": "step"}}


class Score(pl.Callback):
    """After each validation: the task accuracies as an lm-eval-harness results file, plus a row for run.json."""

    def __init__(self, scorer: TaskScorer, out: Path) -> None:
        self.scorer, self.out = scorer, out
        self.rows: list[dict] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: LadderLM) -> None:
        step = trainer.global_step
        name = f"step-{step:09d}"
        scores = self.scorer(pl_module.model)
        d = self.out / name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"results_{name}.json").write_text(json.dumps(results_document(scores, name), indent=1))
        metrics = trainer.callback_metrics
        row = {"step": step, "train_loss": float(metrics["train/loss"]), "val_loss": float(metrics["val/loss"]),
               "probe_loss": float(metrics["csv/probe_mean_loss"]), **{t: v["acc"] for t, v in scores.items()},
               **{f"{t}_stderr": v["acc_stderr"] for t, v in scores.items()}}
        self.rows.append(row)
        print(
            "  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True
        )


def train_run(world: World, scorer: TaskScorer, size: str, mixture: Mixture, out: Path, steps: int, seed: int) -> dict:
    run = f"{size}-{mixture.name}"
    root = out / "runs" / run
    start = time.perf_counter()
    pl.seed_everything(seed, workers=False, verbose=False)
    ckpts = checkpoint_steps(steps)
    module = LadderLM(size, world, world.token_stream(mixture, seed=seed), world.validation_windows(), ckpts, seed)
    score = Score(scorer, root / "lmeval")
    collect = SalienceCallback(vectors=None, probe=world.probe(), batch_size=32, save_dir=root / "losses",
                               model_attr="model", wandb_extras=False)
    trainer = pl.Trainer(max_epochs=len(ckpts), max_steps=steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1, callbacks=[collect, score])
    trainer.fit(module)
    info = {"run": run, "size": size, "n_layer": SIZES[size][0], "n_embd": SIZES[size][1], "lr": module.lr,
            "params": sum(p.numel() for p in module.model.parameters()), "mixture": mixture.shares(),
            "steps": steps, "batch": BATCH, "seconds": time.perf_counter() - start, "checkpoints": score.rows}
    (root / "run.json").write_text(json.dumps(info, indent=1))
    if (size, mixture.name) == SAVED_MODEL_RUN:
        module.model.save_pretrained(out / "model")
        world.tokenizer.save_pretrained(out / "model")
        last = f"step-{steps:09d}"
        results = (root / "lmeval" / last / f"results_{last}.json").relative_to(out)
        (out / "model" / "ladder.json").write_text(json.dumps({"run": run, "step": steps, "results": str(results)}))
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--sizes", nargs="+", default=LADDER_SIZES, choices=list(SIZES))
    parser.add_argument("--mixtures", nargs="+", default=[m.name for m in MIXTURES], choices=[m.name for m in MIXTURES])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (the machine is shared)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, in worker processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or args.steps < FIRST_CHECKPOINT:
        parser.error(f"--jobs and --threads must be >= 1 and --steps >= {FIRST_CHECKPOINT}.")
    _init_worker(args.seed, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    _WORKER["world"].probe().save(args.out / "probe.safetensors")
    # Largest models first, so the long runs do not end up alone at the end.
    runs = [(size, m.name) for size in reversed(args.sizes) for m in MIXTURES if m.name in args.mixtures]
    total = time.perf_counter()
    if args.jobs == 1:
        infos = [_job(r, args.out, args.steps, args.seed) for r in runs]
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh workers: no forked torch/tokenizers thread state
        with ProcessPoolExecutor(args.jobs, ctx, initializer=_init_worker, initargs=(args.seed, args.threads)) as pool:
            infos = list(pool.map(_job, runs, *zip(*[(args.out, args.steps, args.seed)] * len(runs))))
    print(
        f"ladder: {len(infos)} runs, {time.perf_counter() - total:.1f} s wall "
        f"({sum(i['seconds'] for i in infos):.1f} s "
        f"summed over runs), {args.jobs} jobs x {args.threads} threads, load average {os.getloadavg()}"
    )


_WORKER: dict = {}  # this process's World and TaskScorer, built once per worker


def _init_worker(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["world"] = World(seed=seed)
    _WORKER["scorer"] = TaskScorer(_WORKER["world"])


def _job(run: tuple[str, str], out: Path, steps: int, seed: int) -> dict:
    size, name = run
    mixture = next(m for m in MIXTURES if m.name == name)
    print(f"run {size}-{name}", flush=True)
    info = train_run(_WORKER["world"], _WORKER["scorer"], size, mixture, out, steps, seed)
    print(f"run {size}-{name} done: {info['params']} params, {info['seconds']:.1f} s", flush=True)
    return info


if __name__ == "__main__":
    main()
