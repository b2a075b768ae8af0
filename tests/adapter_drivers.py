"""One driver per training framework, so the same behaviour tests run against both adapters.

``DRIVERS["lightning"]`` trains :class:`lightning_helpers.TinyLM` with a real Lightning Trainer and
:class:`~csv_callback.callback.SalienceCallback`; ``DRIVERS["hf"]`` trains the same tiny GPT-2 (same initial
weights, no dropout) with a real ``transformers.Trainer`` and :class:`~csv_callback.hf.SalienceTrainerCallback`.
Both evaluate every 2 steps on the same 8 held-out blocks and return a :class:`Run`: what a user of that
framework sees, with the framework's own naming taken off (HF's ``eval_`` in front of every metric, its and
Lightning's own metrics such as ``eval_loss`` / ``val_loss``).

Also a command-line entry (``python tests/adapter_drivers.py ddp lightning|hf OUT``): the same 2-rank CPU
(gloo) run under either framework, each rank dumping what it saw. Lightning's "ddp" strategy starts rank 1 by
re-running that command line; the HF Trainer is started by ``torch.distributed.run`` (see :func:`ddp_command`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import lightning_helpers as H
from transformers import Trainer, TrainerCallback, TrainingArguments

from csv_callback import ProbeSet
from csv_callback.callback import SalienceCallback
from csv_callback.hf import SalienceTrainerCallback

EVAL_EVERY = 2


@dataclass
class Run:
    """What one training run showed its user.

    Attributes:
        metrics: evaluation step -> the callback's metrics at that step, named as the callback names them
            (``csv/<task>/pred``, ...), as floats.
        history: the callback's ``history`` rows.
        save_dir: the callback's ``save_dir``.
        model: the trained causal LM (the GPT-2 both frameworks train).
        global_step: training steps done.
        rank: this process's rank (0 outside DDP).
    """

    metrics: dict[int, dict[str, float]]
    history: list[dict[str, Any]]
    save_dir: Path | None
    model: torch.nn.Module
    global_step: int
    rank: int = 0


class Poison:
    """Once training reaches ``step``, the final layer norm becomes NaN: a diverged run from then on."""

    def __init__(self, step: int | None):
        self.step = step

    def __call__(self, model: torch.nn.Module, global_step: int) -> None:
        if self.step is not None and global_step >= self.step:
            with torch.no_grad():
                model.transformer.ln_f.weight.fill_(float("nan"))


class ProbeForwards:
    """Which probe sequences each forward pass of a model scores: ``batches[fingerprint]`` lists, per forward
    that fed only sequences of that probe, their indices (in the order fed). Forwards of training or
    validation data are no probe's and are not recorded.

    Hook a model with ``recorder(model)`` (the drivers' ``watch``).
    """

    def __init__(self, probes: list[ProbeSet]):
        self._index = {p.fingerprint: {tuple(p.sequence(i)[0].tolist()): i for i in range(p.num_sequences)}
                       for p in probes}
        shared = set.intersection(*(set(index) for index in self._index.values())) if len(probes) > 1 else set()
        assert not shared, "ProbeForwards tells probes apart by their sequences: give probes with none in common"
        self.batches: dict[str, list[list[int]]] = {p.fingerprint: [] for p in probes}

    def __call__(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        lengths = [ids.shape[1]] * len(ids) if mask is None else mask.sum(1).tolist()
        rows = [tuple(row[:n].tolist()) for row, n in zip(ids, lengths, strict=True)]
        for fingerprint, index in self._index.items():
            if all(r in index for r in rows):
                self.batches[fingerprint].append([index[r] for r in rows])
                return


class Driver:
    """Trains the tiny GPT-2 a few steps in one framework with that framework's adapter."""

    name: str
    adapter: type

    def __init__(self) -> None:
        self.global_step: int | None = None  # training steps of the last run, also when it raised

    def make(self, vectors: Any, probe: Any, **kw: Any) -> Any:
        """The adapter, built with the given constructor arguments."""
        return self.adapter(vectors, probe, **kw)

    def train(self, tmp: Path, callback: Any, steps: int = 4, lr: float = 3e-3, poison_at: int | None = None,
              watch: Callable[[torch.nn.Module], None] | None = None, ddp: bool = False,
              epochs: int | None = None) -> Run:
        """Train ``steps`` steps (batches of 8 blocks of 32 tokens) with ``callback``, evaluating every 2 steps.

        Args:
            tmp: the run's directory (logs, Trainer output).
            lr: the learning rate; 0 keeps the initial weights, the same in both frameworks.
            poison_at: from this step on the model's final layer norm is NaN (a diverged run).
            watch: called with the GPT-2 when training begins, after the adapter's checks (to hook it).
            ddp: run as one of 2 CPU ranks (gloo), in a process started by :func:`ddp_command`.
            epochs: train this many epochs of the 8 training batches instead, with no ``max_steps`` set (the
                planned end is then ``epochs * 8`` steps).
        """
        raise NotImplementedError


class LightningDriver(Driver):
    name = "lightning"
    adapter = SalienceCallback
    own_metrics = frozenset({"val_loss", "train_loss"})

    def make(self, vectors: Any, probe: Any, **kw: Any) -> SalienceCallback:
        # The LightningModule's GPT-2 is the scored model, as in the HF Trainer: the same forward, the same numbers.
        return SalienceCallback(vectors, probe, model_attr="model", **kw)

    def train(self, tmp: Path, callback: SalienceCallback, steps: int = 4, lr: float = 3e-3,
              poison_at: int | None = None, watch: Callable[[torch.nn.Module], None] | None = None,
              ddp: bool = False, epochs: int | None = None) -> Run:
        module = H.TinyLM(lr=lr)
        poison = Poison(poison_at)
        seen: dict[int, dict[str, float]] = {}
        own = self.own_metrics

        class Record(pl.Callback):
            # callback_metrics: what the loggers, EarlyStopping and ModelCheckpoint receive, on every rank.
            def on_validation_end(self, trainer, pl_module):
                if not trainer.sanity_checking:
                    seen[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                                 if k not in own}

            def on_train_start(self, trainer, pl_module):
                if watch is not None:
                    watch(pl_module.model)

            def on_train_batch_end(self, trainer, pl_module, *args):
                poison(pl_module.model, trainer.global_step)

        kw = {"strategy": "ddp", "devices": 2, "logger": False} if ddp else {}
        kw |= {"max_steps": -1, "max_epochs": epochs} if epochs else {"max_steps": steps}
        t = H.trainer(tmp, [callback, Record()], val_every=EVAL_EVERY, enable_checkpointing=False, **kw)
        try:
            t.fit(module, *H.loaders())
        finally:
            self.global_step = t.global_step
        return Run(seen, callback.history, callback.save_dir, module.model, t.global_step, t.global_rank)


class _Blocks(torch.utils.data.Dataset):
    """The Lightning loaders' token blocks as causal-LM examples for the HF Trainer."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.blocks = loader.dataset.tensors[0]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class HFDriver(Driver):
    name = "hf"
    adapter = SalienceTrainerCallback
    own_metrics = frozenset({"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch",
                             "step"})

    def train(self, tmp: Path, callback: SalienceTrainerCallback, steps: int = 4, lr: float = 3e-3,
              poison_at: int | None = None, watch: Callable[[torch.nn.Module], None] | None = None,
              ddp: bool = False, epochs: int | None = None) -> Run:
        model = H.TinyLM(lr=lr).model  # the same GPT-2 the Lightning driver trains, dropout off
        poison = Poison(poison_at)

        class Hooks(TrainerCallback):
            # After the adapter in the callback list: its checks at train begin have run when watch hooks the model.
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                if watch is not None:
                    watch(model)

            def on_step_end(self, args, state, control, model=None, **kwargs):
                poison(model, state.global_step)

        train, val = H.loaders()
        args = TrainingArguments(
            output_dir=str(tmp / "out"), per_device_train_batch_size=train.batch_size,
            per_device_eval_batch_size=val.batch_size, learning_rate=lr, eval_strategy="steps", eval_steps=EVAL_EVERY,
            save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
            **({"ddp_backend": "gloo"} if ddp else {}),
            **({"max_steps": -1, "num_train_epochs": epochs} if epochs else {"max_steps": steps}),
        )
        trainer = Trainer(model=model, args=args, train_dataset=_Blocks(train), eval_dataset=_Blocks(val),
                          processing_class=H.tokenizer(), callbacks=[callback, Hooks()])
        try:
            trainer.train()
        finally:
            self.global_step = trainer.state.global_step
        seen = {}
        for logs in trainer.state.log_history:
            if "eval_loss" in logs:
                seen[logs["step"]] = {k.removeprefix("eval_"): float(v) for k, v in logs.items()
                                      if k not in self.own_metrics}
        return Run(seen, callback.history, callback.save_dir, model, trainer.state.global_step, args.process_index)


DRIVERS = {"lightning": LightningDriver, "hf": HFDriver}


# ---------------------------------------------------------------------- DDP: 2 CPU ranks in other processes
def two_probes() -> tuple[ProbeSet, ProbeSet]:
    """Probes of 17 and 13 sequences from different pydoc pages (no sequence in common)."""
    return H.make_probe(n_texts=4), ProbeSet.from_texts([t[:400] for t in H.pydoc_corpus()[4:7]], H.tokenizer(), 48)


def ddp_probes() -> list[ProbeSet]:
    """17, 13 and 1 sequences: shards of unequal size, and a probe with fewer sequences than ranks."""
    return [*two_probes(), ProbeSet.from_texts(["One short probe text."], H.tokenizer(), max_length=16)]


def ddp_command(framework: str, out: Path) -> list[str]:
    """The command line of a 2-rank run of ``framework`` writing into ``out``."""
    script = [__file__, "ddp", framework, str(out)]
    if framework == "lightning":  # Lightning starts rank 1 itself
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script]


def _ddp_run(framework: str, out: Path) -> None:
    """Train 4 steps on 2 ranks, evaluating at steps 2 and 4; every rank dumps its metrics, history and the probe
    sequences it scored, rank 0 the final weights, the probes and the vectors."""
    from safetensors.torch import save_model

    torch.set_num_threads(1)  # two ranks on two cores
    probes = ddp_probes()
    vectors = [H.plain_vector(p, name, i) for i, (p, name) in enumerate(zip(probes, "abc", strict=True))]
    driver = DRIVERS[framework]()
    forwards = ProbeForwards(probes)
    run = driver.train(out, driver.make(vectors, probes, batch_size=2, save_dir=out / "store"), watch=forwards,
                       ddp=True)
    dump = {"metrics": run.metrics, "history": run.history, "forwards": forwards.batches}
    (out / f"rank{run.rank}.json").write_text(json.dumps(dump))
    if run.rank == 0:
        save_model(run.model, str(out / "model.safetensors"))
        for p, v, name in zip(probes, vectors, "abc", strict=True):
            p.save(out / f"probe_{name}.safetensors")
            v.save(out / f"vector_{name}.safetensors")


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        _ddp_run(sys.argv[2], Path(sys.argv[3]))
