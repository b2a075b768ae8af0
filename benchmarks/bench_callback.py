"""What SalienceCallback costs: per validation, and on the training hot path.

    PYTHONPATH=. python benchmarks/bench_callback.py [--steps 40]

Measures, on a GPT-2 (2 layers, 128 wide, 4k vocabulary) built from a config and a probe of 32 x 256 tokens:
  * csv/eval_seconds the callback logs in real Trainer runs (CSV logger + save_dir; W&B offline logger +
    save_dir, which adds the predictions table and, once, the salience view), each paired with a bare
    no-grad forward over the probe's sequences (batches padded to their own longest) timed right after
    the same validation: that forward is the floor any probe evaluation pays;
  * the median training step of runs without and with the callback, alternated (A B A B) so load drift on
    the shared machine hits both alike. The callback has no per-batch hooks, so the ratio should be ~1.
Prints medians and ratios; the machine is shared, so absolute times are noisy and ratios are what count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from csv_callback import ProbeSet, SalienceVector, SigmoidLink
from csv_callback.callback import SalienceCallback
from csv_callback.testing import pydoc_corpus, tiny_gpt2, train_tokenizer

SEQ, N_SEQ, BATCH = 256, 32, 8


class LM(pl.LightningModule):
    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = tiny_gpt2(len(tokenizer), n_positions=SEQ, n_layer=2, n_embd=128)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Clock(pl.Callback):
    """Wall time of every training step; per validation, the logged eval_seconds and a bare probe forward."""

    def __init__(self, probe: ProbeSet):
        self.probe = probe
        self.steps, self.eval_seconds, self.floor = [], [], []

    def on_train_batch_start(self, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.steps.append(time.perf_counter() - self._t)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "csv/eval_seconds" in trainer.callback_metrics:
            self.eval_seconds.append(float(trainer.callback_metrics["csv/eval_seconds"]))
            t = time.perf_counter()
            bare_forward(pl_module.model.eval(), self.probe)
            self.floor.append(time.perf_counter() - t)
            pl_module.model.train()


def bare_forward(model: torch.nn.Module, probe: ProbeSet) -> None:
    order = torch.argsort(probe.lengths, descending=True)
    with torch.no_grad():
        for b in range(0, len(order), BATCH):
            seqs = [probe.sequence(int(i))[0] for i in order[b : b + BATCH]]
            t = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), t, dtype=torch.int64)
            attn = torch.zeros_like(ids)
            for r, s in enumerate(seqs):
                ids[r, : len(s)], attn[r, : len(s)] = s, 1
            model(input_ids=ids, attention_mask=attn, use_cache=False)


def run(tokenizer, probe, train, val, callbacks: list, logger, steps: int) -> Clock:
    clock = Clock(probe)
    pl.Trainer(max_steps=steps, val_check_interval=10, check_val_every_n_epoch=None, limit_val_batches=2,
               accelerator="cpu", devices=1, logger=logger, callbacks=[*callbacks, clock], enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0).fit(
        LM(tokenizer), train, val)
    return clock


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40, help="training steps per run (a validation every 10)")
    args = ap.parse_args()
    torch.manual_seed(0)
    corpus = pydoc_corpus()
    tokenizer = train_tokenizer(corpus, vocab_size=4096)
    probe = ProbeSet.from_texts(corpus[:40], tokenizer, max_length=SEQ)
    probe = ProbeSet(*_first_sequences(probe, N_SEQ), tokenizer_hash=probe.tokenizer_hash, max_length=SEQ)
    w = np.random.default_rng(0).random(probe.n_tokens)
    vector = SalienceVector(w / w.sum(), SigmoidLink(0.25, 0.9, 2.0, 6.0), task="bench",
                            probe_fingerprint=probe.fingerprint, tokenizer_hash=probe.tokenizer_hash)
    stream = torch.tensor(tokenizer(" ".join(corpus[40:]))["input_ids"])
    blocks = stream[: (len(stream) // SEQ) * SEQ].view(-1, SEQ)
    train = DataLoader(TensorDataset(blocks[:-16]), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(blocks[-16:]), batch_size=8)

    print(
        f"probe: {probe.num_sequences} sequences, {probe.n_tokens} scored tokens; torch threads "
        f"{torch.get_num_threads()}"
    )
    med = statistics.median
    steps = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(2):
            steps["without"] += run(tokenizer, probe, train, val, [], False, args.steps).steps
            cb = SalienceCallback(vector, probe, batch_size=BATCH, save_dir=tmp / f"store{i}", model_attr="model")
            clock = run(tokenizer, probe, train, val, [cb], pl.loggers.CSVLogger(str(tmp), name=f"cb{i}"), args.steps)
            steps["with"] += clock.steps
        cbw = SalienceCallback(vector, probe, batch_size=BATCH, save_dir=tmp / "store_w", model_attr="model")
        wandb_logger = pl.loggers.WandbLogger(save_dir=str(tmp), offline=True, project="bench")
        with_wandb = run(tokenizer, probe, train, val, [cbw], wandb_logger, args.steps)
        wandb_logger.experiment.finish()

    for name, c in (("CSV logger + save_dir", clock), ("W&B offline + save_dir", with_wandb)):
        ratios = [e / f for e, f in zip(c.eval_seconds, c.floor)]
        print(f"csv/eval_seconds, {name:<24} median {med(c.eval_seconds):6.3f} s; bare forward {med(c.floor):6.3f} s; "
              f"ratio median {med(ratios):.2f} (per validation: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(
        f"training step without / with callback: {med(steps['without']) * 1e3:.1f} / {med(steps['with']) * 1e3:.1f} ms "
        f"(ratio {med(steps['with']) / med(steps['without']):.3f}; {len(steps['with'])} steps each)"
    )


def _first_sequences(probe: ProbeSet, n: int):
    """Tensors of a ProbeSet holding only the first ``n`` sequences of ``probe``."""
    end = int(probe.offsets[n])
    n_scored = int(probe.score_offsets[n])
    return probe.input_ids[:end], probe.offsets[: n + 1], probe.score_mask[:end], probe.answer_mask[:n_scored]


if __name__ == "__main__":
    main()
