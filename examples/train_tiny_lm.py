"""Train a small GPT-2 on a data mixture the shipped salience vectors never saw, and watch the predicted
benchmark accuracies stream into W&B next to the accuracies lm-eval-harness really measures.

    python examples/train_tiny_lm.py            # W&B offline run under demo_run/wandb
    python examples/train_tiny_lm.py --no-wandb # CSV logs only

The vectors in ``examples/assets/`` were fitted on the ladder benchmark (``benchmarks/ladder``: 4 model sizes
x 9 data mixtures x 9 checkpoints, scored with lm-eval-harness) for its three multiple-choice tasks: facts
to recall, sums to complete and letter patterns to continue. This run uses the ladder's world (the same
locally trained tokenizer, pydoc text plus generated capability lines) with a new mixture of those sources.
:class:`SalienceCallback` predicts each task's accuracy at every validation, from one forward pass over the
probe; every few validations the real lm-eval-harness runs the three tasks (local YAML + JSONL) on the
in-memory model, so the table printed at the end and the PNG show prediction and truth side by side.
Everything is local and offline; it takes about two minutes on a CPU core. Needs the ``lmeval`` extra.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __name__ == "__main__":
    # The console shows the demo's own progress lines, not the libraries'. tqdm reads TQDM_* defaults when it is
    # imported, so this comes before the imports below: lm-eval's request building and the datasets library
    # draw bars that have no off switch of their own. transformers' only message says GPT2LMHeadModel's class
    # name names no loss type, so the causal-LM loss is used: the right one.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "examples" / "assets"
sys.path.insert(0, str(ROOT / "benchmarks" / "ladder"))  # the ladder's world: its tokenizer, data and tasks

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from train import SIZES, LadderLM  # noqa: E402
from world import TASKS, Mixture, World  # noqa: E402

from csv_callback.callback import SalienceCallback  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Shares of the training lines per capability source; the ladder's mixtures are general (2% each), one
# source at 30%, balanced (10%), capable (20%), two sources at 20%, sums at 50%: this one is none of them.
DEMO_MIXTURE = Mixture("demo", facts=0.15, arith=0.25, pattern=0.06)


def quiet_libraries() -> None:
    """Silence what the libraries print on their own in the demo's process; csv_callback's warnings still show.

    Lightning's info lines (accelerators, a LitLogger tip, why fit stopped), lm-eval's notes on being handed a
    model object, W&B's notices (``anonymous`` is deprecated, and Lightning's WandbLogger always passes it), and
    a deprecation inside Lightning that torch 2.13 reports at every validation.
    """
    import wandb

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    wandb.setup(wandb.Settings(silent=True))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


def describe(mixture: Mixture) -> str:
    """The mixture in words: "facts 15%, arith 25%, pattern 6%, general text 54% of the training lines"."""
    shares = mixture.shares()
    parts = [f"{source} {share:.0%}" for source, share in shares.items()]
    return ", ".join([*parts, f"general text {1 - sum(shares.values()):.0%}"]) + " of the training lines"


class LmEvalAccuracy(pl.Callback):
    """Every ``every`` validations, run lm-eval-harness on the in-memory model and log ``lmeval/<task>/acc``.

    This is the measurement the prediction replaces; it is here to show how close the prediction is.
    """

    def __init__(self, world: World, task_dir: Path, every: int) -> None:
        import lm_eval  # the optional extra: fail before training, not at the first evaluation
        from lm_eval.tasks import TaskManager

        self.world, self.every, self.lm_eval = world, every, lm_eval
        self.tasks = TaskManager(include_path=str(world.write_tasks(task_dir)), include_defaults=False)
        self.rows: list[dict] = []
        self.seconds: list[float] = []  # wall time of each lm-eval run, aligned with rows
        self._validations = 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: LadderLM) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every and trainer.global_step < trainer.max_steps:
            return
        start = time.perf_counter()
        acc = self.measure(pl_module.model, str(pl_module.device))
        self.seconds.append(time.perf_counter() - start)
        for t, v in acc.items():
            pl_module.log(f"lmeval/{t}/acc", v)
        self.rows.append({"step": trainer.global_step, **acc})

    def measure(self, model: torch.nn.Module, device: str = "cpu") -> dict[str, float]:
        """One lm-eval-harness run of the three tasks on ``model`` as it is now: task -> ``acc``.

        A method of its own so that benchmarks/bench_vs_lmeval.py times exactly this run.
        """
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=self.world.tokenizer, batch_size=64, device=device)
        # simple_evaluate cannot turn off the model's progress bars; the model API's disable_tqdm can.
        lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
        results = self.lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=self.tasks,
                                               bootstrap_iters=0)["results"]
        return {t: float(results[t]["acc,none"]) for t in TASKS}


class Progress(pl.Callback):
    """One console line per validation: the step, the time since ``start``, and lm-eval's time when it ran.

    Placed after ``measure`` in the Trainer's callbacks, so this validation's lm-eval run has been recorded.
    """

    def __init__(self, measure: LmEvalAccuracy, start: float) -> None:
        self.measure, self.start = measure, start

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: LadderLM) -> None:
        if trainer.sanity_checking:
            return
        step, last = trainer.global_step, trainer.max_steps
        line = f"  step {step:>{len(str(last))}}/{last} {time.time() - self.start:6.0f} s  predicted"
        if self.measure.rows and self.measure.rows[-1]["step"] == step:
            line += f"; lm-eval-harness measured in {self.measure.seconds[-1]:.0f} s"
        print(line, flush=True)


def print_table(history: list[dict], measured: list[dict]) -> None:
    """One row per validation: each task's predicted accuracy, and lm-eval's where it was measured."""
    pred = {(r["step"], r["task"]): r["pred"] for r in history}
    truth = {r["step"]: r for r in measured}
    print(f"\n{'step':>6}" + "".join(f"{t.removeprefix('ladder_') + ' pred':>14}{'lm-eval':>9}" for t in TASKS))
    for step in sorted({step for step, _ in pred}):
        true = truth.get(step, {})
        print(
            f"{step:>6}"
            + "".join(f"{pred[step, t]:>14.3f}" + (f"{true[t]:>9.3f}" if t in true else " " * 9) for t in TASKS)
        )
    err = [pred[r["step"], t] - r[t] for r in measured for t in TASKS]
    print(f"prediction vs lm-eval over {len(measured)} evaluations x {len(TASKS)} tasks: "
          f"MSE {sum(e * e for e in err) / len(err):.2e}, MAE {sum(abs(e) for e in err) / len(err):.3f}")


def print_forecast(history: list[dict], measured: list[dict]) -> None:
    """One row per validation: each task's forecast of the final score made then, with its 80% interval, and the
    final score lm-eval measured."""
    rows = {(r["step"], r["task"]): r for r in history}
    steps = sorted({step for step, _ in rows})
    final = measured[-1]
    print(f"\nforecast of the step-{final['step']} accuracy made at each validation [80% interval], and the final one:")
    print(f"{'step':>6}" + "".join(f"{t.removeprefix('ladder_'):>22}" for t in TASKS))
    for step in steps:
        cells = (rows[step, t] for t in TASKS)
        print(f"{step:>6}" + "".join(f"{r['forecast']:>9.3f} [{r['forecast_lo']:.2f}, {r['forecast_hi']:.2f}]"
                                     for r in cells))
    print(f"{'final':>6}" + "".join(f"{final[t]:>9.3f}{'(lm-eval)':>13}" for t in TASKS))


def plot(history: list[dict], measured: list[dict], path: Path) -> Figure:
    """Left: predicted accuracy over training (lines) and lm-eval's measurements (dots), per task. Right: the forecast
    of the final accuracy made at each validation, its 80% band, and the final accuracy lm-eval measured (dashed).
    Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, fc) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for t, colour in zip(TASKS, ("C0", "C1", "C2")):
        rows = [r for r in history if r["task"] == t]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["pred"] for r in rows], color=colour, label=f"{t}: predicted")
        ax.scatter([r["step"] for r in measured], [r[t] for r in measured], color=colour, marker="o", s=30,
                   edgecolor="k", zorder=3, label=f"{t}: lm-eval")
        fc.plot(steps, [r["forecast"] for r in rows], color=colour, marker=".", label=f"{t}: forecast")
        fc.fill_between(steps, [r["forecast_lo"] for r in rows], [r["forecast_hi"] for r in rows], color=colour,
                        alpha=0.15, lw=0)
        fc.axhline(measured[-1][t], color=colour, lw=1, ls="--")
    for a in (ax, fc):
        a.axhline(0.25, color="grey", lw=0.8, ls=":")
        a.set(xlabel="training step", ylim=(0, 1))
    ax.set(ylabel="accuracy",
           title=f"Predicted vs lm-eval-harness accuracy on an unseen mixture:\n{describe(DEMO_MIXTURE)}")
    fc.set(title=f"Forecast of the step-{measured[-1]['step']} accuracy made at each validation\n(80% band; "
                 "dashed: what lm-eval measured there)")
    for a in (ax, fc):
        a.title.set_fontsize(9)
        a.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-wandb", action="store_true", help="log to CSV only (default: W&B offline run)")
    ap.add_argument("--out", type=Path, default=Path("demo_run"), help="directory for logs, losses and the plot")
    ap.add_argument("--size", default="s3", choices=list(SIZES), help="model size of the ladder")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--val-every", type=int, default=200, help="training steps between validations")
    ap.add_argument("--lmeval-every", type=int, default=2, help="validations between lm-eval runs (and the last)")
    # One thread: this model is too small to gain from a second, and on a busy 2-core machine a second torch
    # thread made the whole demo 9x slower (measured: 505 s vs 56 s).
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    if args.steps < args.val_every or args.val_every < 1 or args.lmeval_every < 1:
        ap.error("need --steps >= --val-every >= 1 and --lmeval-every >= 1.")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    # Each demo run starts over, as its plot does: the loss store refuses a second fresh run's steps.
    if (args.out / "probe_losses").exists():
        shutil.rmtree(args.out / "probe_losses")

    world = World()
    vectors = sorted(ASSETS.glob("ladder_*.safetensors"))
    steps = list(range(args.val_every, args.steps + 1, args.val_every))
    module = LadderLM(
        args.size, world, world.token_stream(DEMO_MIXTURE, seed=1), world.validation_windows(), steps, seed=1
    )
    predict = SalienceCallback(vectors, ASSETS / "probe.safetensors", batch_size=32, save_dir=args.out / "probe_losses",
                               model_attr="model")
    measure = LmEvalAccuracy(world, args.out / "tasks", args.lmeval_every)
    progress = Progress(measure, t0)
    if args.no_wandb:
        logger = pl.loggers.CSVLogger(str(args.out), name="csv")
    else:
        logger = pl.loggers.WandbLogger(save_dir=str(args.out), offline=True, project="csv-callback-demo")
    trainer = pl.Trainer(max_epochs=len(steps), max_steps=steps[-1], accelerator="auto", devices=1, logger=logger,
                         callbacks=[predict, measure, progress], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, reload_dataloaders_every_n_epochs=1,
                         log_every_n_steps=50, default_root_dir=str(args.out))
    params = sum(p.numel() for p in module.model.parameters())
    tasks = ", ".join(t.removeprefix("ladder_") for t in TASKS)
    print(f"Training GPT-2 {args.size} ({params:,} parameters) for {steps[-1]} steps on a data mixture the shipped "
          f"vectors never saw:\n  {describe(DEMO_MIXTURE)}.\nPredicting {tasks} accuracy from the probe at every "
          f"validation (every {args.val_every} steps);\nlm-eval-harness measures it every {args.lmeval_every} "
          "validations and at the end.", flush=True)
    trainer.fit(module)

    print_table(predict.history, measure.rows)
    print_forecast(predict.history, measure.rows)
    plot(predict.history, measure.rows, args.out / "pred_vs_lmeval.png")
    where = logger.log_dir if args.no_wandb else logger.experiment.dir
    if not args.no_wandb:
        logger.experiment.finish()  # a complete offline run, ready for `wandb sync`
    print(f"done in {time.time() - t0:.0f}s. Plot: {args.out / 'pred_vs_lmeval.png'}; logs: {where}; per-token losses: "
          f"{args.out / 'probe_losses'} (csv_callback.store.load_losses reads them as one [m, n] matrix).")
    return {"history": predict.history, "measured": measure.rows, "logger_dir": where}


if __name__ == "__main__":
    quiet_libraries()
    main()
