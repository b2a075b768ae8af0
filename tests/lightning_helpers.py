"""Real components for the callback tests: a tiny GPT-2 LightningModule, token-block data from CPython's
pydoc pages, a probe, and salience vectors (fitted for real, or built by hand where a test is about plumbing).

Also a command-line entry (``python tests/lightning_helpers.py ddp|fault OUT``) for the runs that must
happen in another process: DDP with 2 CPU ranks, and a run on a deliberately tiny filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl

from csv_callback import ProbeSet, SalienceVector, SigmoidLink, fit_salience, token_losses
from csv_callback.testing import pydoc_corpus, tiny_gpt2, train_tokenizer

BLOCK = 32


@lru_cache(maxsize=1)
def tokenizer():
    return train_tokenizer(pydoc_corpus(), vocab_size=512)


@lru_cache(maxsize=1)
def _token_stream() -> torch.Tensor:
    return torch.tensor(tokenizer()(" ".join(pydoc_corpus()[8:]))["input_ids"], dtype=torch.int64)


def loaders(n_train: int = 64, n_val: int = 8, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    """Train / val loaders of ``[batch, BLOCK]`` token blocks, unshuffled so runs are reproducible."""
    blocks = _token_stream()[: (n_train + n_val) * BLOCK].reshape(-1, BLOCK)
    train = DataLoader(TensorDataset(blocks[:n_train]), batch_size=batch_size, shuffle=False)
    val = DataLoader(TensorDataset(blocks[n_train:]), batch_size=batch_size, shuffle=False)
    return train, val


def make_probe(n_texts: int = 6, max_length: int = 48) -> ProbeSet:
    """Probe from pydoc pages the training data never sees; long pages split into several sequences."""
    texts = [t[:400] for t in pydoc_corpus()[:n_texts]]
    return ProbeSet.from_texts(texts, tokenizer(), max_length=max_length)


def plain_vector(probe: ProbeSet, task: str = "plumb", seed: int = 0) -> SalienceVector:
    """A hand-built vector with known random weights, for tests about plumbing rather than fitting."""
    w = np.random.default_rng(seed).random(probe.n_tokens)
    return SalienceVector(
        weights=w / w.sum(), link=SigmoidLink(lo=0.0, hi=1.0, k=1.5, L0=5.0), task=task, metric="acc",
        probe_fingerprint=probe.fingerprint, tokenizer_hash=probe.tokenizer_hash, loss_range=(4.0, 7.0),
        # held-out residuals as fit_salience stores them, so that its prediction intervals are finite
        fit_report={"interval": {"method": "split-conformal", "abs_residuals": [0.01 * i for i in range(1, 21)]}},
    )


class TinyLM(pl.LightningModule):
    """A tiny HF GPT-2 trained on next-token loss; ``forward(ids)`` returns logits ``[B, T, V]``.

    ``lr_until``: the learning rate drops to 0 after that many steps, so the model (and every score
    predicted from it) stops changing. ``poison_at``: after that step the final layer norm is set to NaN,
    as in a diverged run. ``tokens_seen`` counts training tokens (a buffer, so it survives resume).
    """

    def __init__(self, lr: float = 3e-3, lr_until: int | None = None, poison_at: int | None = None, seed: int = 0):
        super().__init__()
        self.tokenizer = tokenizer()
        self.model = tiny_gpt2(len(self.tokenizer), n_positions=64, seed=seed)
        for m in self.model.modules():  # no dropout: a resumed run must replay the uninterrupted one exactly
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        self.lr, self.lr_until, self.poison_at = lr, lr_until, poison_at
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.float64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def _loss(self, batch) -> torch.Tensor:
        (ids,) = batch
        logits = self(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        self.tokens_seen += batch[0].numel()
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.poison_at is not None and self.global_step >= self.poison_at:
            with torch.no_grad():
                self.model.transformer.ln_f.weight.fill_(float("nan"))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.lr_until is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < self.lr_until else 0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CrashAt(pl.Callback):
    """Kills the run (an exception, as a lost node would) when training step ``step`` begins."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("node lost")


def crashed_then_resumed(tmp: Path, make_callback) -> pl.Callback:
    """A 12-step run (validations every 2 steps, checkpoints when they end, CSV logs ``csv/version_0``) that dies in
    step 8, so its last checkpoint is the one of the validation at step 6; then the run resumed from that
    checkpoint (``csv/version_1``) to the end. ``make_callback()`` builds each run's callback; returns the resumed
    run's. 6 batches per epoch: the data resumes exactly where it was."""
    import pytest
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    def run(version: int, extra: list, ckpt_path=None) -> pl.Callback:
        cb = make_callback()
        ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)
        logger = CSVLogger(str(tmp), name="csv", version=version)
        trainer(tmp, [cb, ckpt, *extra], max_steps=12, val_every=2, logger=logger).fit(
            TinyLM(), *loaders(n_train=48), ckpt_path=ckpt_path)
        return cb

    with pytest.raises(RuntimeError, match="node lost"):
        run(0, [CrashAt(7)])
    return run(1, [], ckpt_path=tmp / "ckpt" / "last.ckpt")


def trainer(tmp: Path, callbacks: list, max_steps: int = 8, val_every: int = 2, logger=None, **kw) -> pl.Trainer:
    """A CPU trainer validating every ``val_every`` steps, with a CSVLogger under ``tmp`` unless given."""
    if logger is None:
        logger = pl.loggers.CSVLogger(str(tmp), name="csv", version=0)
    args = {
        "max_steps": max_steps,
        "val_check_interval": val_every,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": logger,
        "callbacks": callbacks,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 1,
        "default_root_dir": str(tmp),
        "deterministic": True,
    }
    args.update(kw)
    return pl.Trainer(**args)


def read_csv_metrics(log_dir: Path, column: str) -> dict[int, float]:
    """``{step: value}`` of one column of a CSVLogger's metrics.csv (rows where it is set)."""
    import csv

    out: dict[int, float] = {}
    with open(Path(log_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get(column):
                step = int(row["step"])
                assert step not in out, f"step {step} logged twice for {column}"
                out[step] = float(row[column])
    return out


def fitted_vector(probe: ProbeSet) -> SalienceVector:
    """A vector fitted for real: probe losses of checkpoints of two short training runs (the groups), scored
    by top-1 next-token accuracy on held-out pydoc text (a downstream metric with range [0, 1])."""
    held_out = _token_stream()[-20 * BLOCK:].reshape(-1, BLOCK)
    losses, scores, groups = [], [], []
    for seed, lr in ((0, 0.05), (1, 0.02)):
        torch.manual_seed(seed)
        module = TinyLM(seed=seed)
        opt = torch.optim.Adam(module.parameters(), lr=lr)
        train, _ = loaders(n_train=96)
        for step, (ids,) in enumerate(train):
            if step % 2 == 0:
                losses.append(token_losses(module.model, probe).numpy())
                with torch.no_grad():
                    pred = module(held_out[:, :-1]).argmax(-1)
                scores.append(float((pred == held_out[:, 1:]).float().mean()))
                groups.append(f"seed{seed}")
            loss = module._loss((ids,))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return fit_salience(np.stack(losses), np.array(scores), groups=groups, probe=probe, task="nexttok", metric="acc")


# ---------------------------------------------------------------------- runs in a separate process
def _ddp_run(out: Path) -> None:
    """2 CPU ranks (gloo): fit 4 steps, validate, and dump every rank's metrics and the final weights.

    Run as a script: Lightning's "ddp" strategy starts rank 1 by re-running this command line."""
    from safetensors.torch import save_model

    from csv_callback.callback import SalienceCallback

    class Dump(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            row = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("csv/") and "seconds" not in k
            }
            with open(out / f"rank{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": trainer.global_step, **row}) + "\n")

    # 17, 13 and 1 sequences: shards of unequal size, and a probe with fewer sequences than ranks.
    probes = [make_probe(n_texts=4, max_length=48), make_probe(n_texts=3, max_length=48),
              ProbeSet.from_texts(["One short probe text."], tokenizer(), max_length=16)]
    vectors = [plain_vector(p, name, i) for i, (p, name) in enumerate(zip(probes, "abc"))]
    module = TinyLM()
    cb = SalienceCallback(vectors, probes, batch_size=2, save_dir=out / "store")
    t = trainer(out, [cb, Dump()], max_steps=4, val_every=2, strategy="ddp", devices=2, logger=False,
                num_sanity_val_steps=0)
    train, val = loaders(n_train=32)
    t.fit(module, train, val)
    t.validate(module, val, verbose=False)
    if t.is_global_zero:
        save_model(module.model, str(out / "model.safetensors"))
        for p, v, name in zip(probes, vectors, "abc"):
            p.save(out / f"probe_{name}.safetensors")
            v.save(out / f"vector_{name}.safetensors")


def _fault_run(out: Path, small: Path) -> None:
    """Train with ``save_dir`` on ``small``, a filesystem that fills up, and W&B's media directory on a full one.

    Must run as root of a private mount namespace (``unshare -rm``) so it can mount the full tmpfs.
    """
    import subprocess
    import warnings

    from csv_callback.callback import SalienceCallback
    from csv_callback.store import load_losses

    probe = make_probe(n_texts=6, max_length=48)
    cb = SalienceCallback(plain_vector(probe), probe, save_dir=small / "store")
    logger = pl.loggers.WandbLogger(save_dir=str(out), offline=True, project="fault")
    media = Path(logger.experiment.dir) / "media"
    media.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(media)], check=True)
    with contextlib.suppress(OSError):  # the tmpfs is full after this
        (media / "filler").write_bytes(b"x" * 8192)
    train, val = loaders()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(out, [cb], max_steps=8, val_every=2, logger=logger, num_sanity_val_steps=0)
        t.fit(TinyLM(), train, val)
    logger.experiment.finish()
    table = load_losses(small / "store", fingerprint=probe.fingerprint)
    result = {
        "global_step": t.global_step,
        "history_steps": sorted({r["step"] for r in cb.history}),
        "stored_steps": table.steps.tolist(),
        "stored_ok": bool(np.isfinite(table.losses).all()),
        "warnings": [str(w.message) for w in caught if "SalienceCallback could not" in str(w.message)],
        "run_dir": str(Path(logger.experiment.dir).parent),
        "leftover_tmp": [p.name for p in (small / "store" / "losses").iterdir() if ".tmp-" in p.name],
    }
    (out / "fault.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        _ddp_run(Path(sys.argv[2]))
    elif sys.argv[1] == "fault":
        _fault_run(Path(sys.argv[2]), Path(sys.argv[3]))
