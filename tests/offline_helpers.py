"""Real checkpoints for the offline-workflow tests: a tiny GPT-2 trained a few steps, saved along the way."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from csv_callback.testing import tiny_gpt2


def arithmetic_items(n: int = 36) -> list[dict]:
    """Multiple-choice questions "What is a plus b?" with the right sum first (lm-eval doc format)."""
    items = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        items.append(
            {
                "question": f"What is {a} plus {b}? Answer:",
                "choices": [f" {a + b}", f" {a + b + 3}", f" {a * 2 + 7}"],
                "answer": 0,
            }
        )
    return items


def train_ladder(
    root: Path, tokenizer, texts: list[str], save_at: tuple[int, ...], seed: int = 0, lr: float = 3e-3
) -> list[Path]:
    """Train a tiny GPT-2 on ``texts`` and ``save_pretrained`` it (with the tokenizer) at each step in ``save_at``."""
    model = tiny_gpt2(len(tokenizer), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    dirs = []
    for step in range(max(save_at) + 1):
        if step in save_at:
            d = root / f"step{step}"
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            dirs.append(d)
        if step == max(save_at):
            break
        model.train()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return dirs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: on a shared 2-core machine two spinning intra-op threads make these tiny
    models up to 100x slower (measured: 1-3 s vs 0.03 s per training step of the tiny GPT-2)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def subprocess_env() -> dict[str, str]:
    """Environment for CLI subprocesses: offline, and one thread for the same reason as one_torch_thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}
