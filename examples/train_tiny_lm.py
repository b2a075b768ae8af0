"""Train a tiny GPT-2 with Lightning and watch a predicted benchmark score stream in, live.

    PYTHONPATH=. python examples/train_tiny_lm.py            # W&B offline run under ./wandb
    PYTHONPATH=. python examples/train_tiny_lm.py --no-wandb # CSV logs only

Everything is local: a byte-level BPE tokenizer trained on CPython's pydoc pages, a GPT-2 built from a
config, W&B in offline mode (``wandb sync`` uploads the run later, if you want). No pre-fitted salience
vectors ship with csv-callback yet, so this script first FITS ONE ON THE FLY: it trains two short runs,
scores their checkpoints on a tiny multiple-choice task (pick a passage's true next words among 4
orderings of them, lm-eval-harness style ``acc``), and fits a vector from their probe losses. Then the main run trains with
:class:`SalienceCallback`, which predicts that task's accuracy after every validation; the table printed
also shows the accuracy actually measured, so you can judge the prediction. It takes 1-3 minutes on 2 CPU
cores.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from csv_callback import ProbeSet, fit_salience, sequence_loglikelihoods, token_losses  # noqa: E402
from csv_callback.callback import SalienceCallback  # noqa: E402
from csv_callback.testing import pydoc_corpus, tiny_gpt2, train_tokenizer  # noqa: E402

BLOCK, N_CHOICES = 64, 4


class TinyLM(pl.LightningModule):
    """A GPT-2 from a config; ``self.model`` is the HF causal LM the callback scores."""

    def __init__(self, tokenizer, lr: float, seed: int = 0):
        super().__init__()
        self.tokenizer = tokenizer  # the callback checks the probe was built with this tokenizer
        self.model = tiny_gpt2(len(tokenizer), n_positions=BLOCK, n_layer=2, n_embd=64, seed=seed)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def multiple_choice(pages: list[str], tokenizer, n_items: int, seed: int = 0) -> ProbeSet:
    """(context, choice) pairs: a passage's true next 6 words, and 3 shuffles of those words as distractors."""
    rng = random.Random(seed)
    passages = [p.split() for p in pages if len(p.split()) > 40]
    fits = lambda text, n: len(tokenizer(text)["input_ids"]) <= n  # noqa: E731  (skip code-heavy spans)
    pairs = []
    while len(pairs) < n_items * N_CHOICES:
        words = rng.choice(passages)
        i = rng.randrange(16, len(words) - 6)
        context, true = " ".join(words[i - 16 : i]), words[i : i + 6]
        choices = [" " + " ".join(true)]
        for _ in range(50):  # distinct shuffles; a span of repeated words may have too few
            shuffled = " " + " ".join(rng.sample(true, len(true)))
            if shuffled not in choices:
                choices.append(shuffled)
            if len(choices) == N_CHOICES:
                break
        if len(choices) < N_CHOICES:
            continue
        if fits(context, 40) and all(fits(c, 20) for c in choices):
            pairs += [(context, c) for c in choices]  # the true continuation is always choice 0
    return ProbeSet.from_pairs(pairs, tokenizer, max_length=BLOCK)


def mc_accuracy(model, mc: ProbeSet) -> float:
    """lm-eval ``acc``: the item is right when the true continuation has the highest summed log-likelihood."""
    loglik = sequence_loglikelihoods(token_losses(model, mc, batch_size=32), mc)
    return float((loglik.view(-1, N_CHOICES).argmax(1) == 0).float().mean())


def fit_vector_on_the_fly(tokenizer, train_blocks, probe, mc, steps: int, every: int):
    """Checkpoints of two short runs (different learning rates and data orders) -> a fitted vector."""
    losses, scores, groups = [], [], []
    for run, (lr, seed) in enumerate(((3e-3, 1), (1e-3, 2))):
        module = TinyLM(tokenizer, lr, seed=seed)
        opt = module.configure_optimizers()
        order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
        for step in range(steps + 1):
            if step % every == 0:
                losses.append(token_losses(module.model, probe, batch_size=32).numpy())
                scores.append(mc_accuracy(module.model, mc))
                groups.append(f"run{run}")
            if step < steps:
                ids = train_blocks[order[(step * 16) % len(order) :][:16]]
                module.model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
    return fit_salience(np.stack(losses), np.array(scores), groups=groups, probe=probe, task="pydoc_mc", metric="acc")


class LiveTable(pl.Callback):
    """Prints one compact row per validation: the prediction next to the accuracy actually measured."""

    def __init__(self, mc: ProbeSet):
        self.mc = mc

    def on_fit_start(self, trainer, pl_module):
        print(f"{'step':>6} {'val_loss':>8} {'pred acc':>8} {'true acc':>8} {'w.loss':>7} {'extrap':>6} {'csv s':>6}")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        print(f"{trainer.global_step:>6} {float(m['val_loss']):8.3f} {float(m['csv/pydoc_mc/pred']):8.3f} "
              f"{mc_accuracy(pl_module.model, self.mc):8.3f} {float(m['csv/pydoc_mc/weighted_loss']):7.3f} "
              f"{'yes' if float(m['csv/pydoc_mc/extrapolating']) else 'no':>6} {float(m['csv/eval_seconds']):6.2f}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-wandb", action="store_true", help="log to CSV only (default: W&B offline run)")
    ap.add_argument("--out", default="tiny_lm_run", help="directory for logs, checkpoints and saved losses")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the main run")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.time()
    out = Path(args.out)

    pages = pydoc_corpus()
    random.Random(0).shuffle(pages)
    train_pages, probe_pages, task_pages = pages[:60], pages[60:66], pages[66:]
    tokenizer = train_tokenizer(train_pages, vocab_size=512)
    stream = torch.tensor(tokenizer(" ".join(train_pages))["input_ids"])
    blocks = stream[: len(stream) // BLOCK * BLOCK].view(-1, BLOCK)
    train_blocks, val_blocks = blocks[:-64], blocks[-64:]
    probe = ProbeSet.from_texts([p[:1500] for p in probe_pages], tokenizer, max_length=BLOCK)
    mc = multiple_choice(task_pages, tokenizer, n_items=60)
    print(f"probe: {probe.n_tokens} scored tokens; task: {mc.num_sequences // N_CHOICES} multiple-choice items")

    print("No pre-fitted salience vector ships yet: fitting one on the fly from two short runs ...", flush=True)
    vector = fit_vector_on_the_fly(tokenizer, train_blocks, probe, mc, steps=100, every=20)
    cv = vector.fit_report.get("cv_mae", {})
    print(f"fitted 'pydoc_mc' on {2 * (100 // 20 + 1)} checkpoints in {time.time() - t0:.0f}s; held-out-run MAE: "
          + ", ".join(f"{k} {v:.3f}" for k, v in cv.items()), flush=True)

    if args.no_wandb:
        logger = pl.loggers.CSVLogger(str(out), name="csv")
    else:
        logger = pl.loggers.WandbLogger(save_dir=str(out), offline=True, project="csv-callback-tiny-lm")
    callback = SalienceCallback(vector, probe, batch_size=32, save_dir=out / "probe_losses", model_attr="model")
    trainer = pl.Trainer(
        max_steps=args.steps, val_check_interval=25, check_val_every_n_epoch=None, limit_val_batches=2,
        accelerator="auto", devices=1, logger=logger, callbacks=[callback, LiveTable(mc)],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out),
        log_every_n_steps=10,
    )
    trainer.fit(TinyLM(tokenizer, lr=3e-3, seed=0),
                DataLoader(TensorDataset(train_blocks), batch_size=16, shuffle=True),
                DataLoader(TensorDataset(val_blocks), batch_size=32))
    where = logger.experiment.dir if not args.no_wandb else logger.log_dir
    print("extrap = the weighted loss left the range seen in fitting; predictions there are extrapolations "
          "(here: the fitting runs were shorter than this one).")
    print(f"done in {time.time() - t0:.0f}s. Logs: {where}; per-token losses: {out / 'probe_losses'} "
          "(csv_callback.store.load_losses reads them as one [m, n] matrix).")


if __name__ == "__main__":
    main()
