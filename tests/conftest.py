"""Shared real components: a BPE tokenizer trained locally on CPython's pydoc pages and a tiny HF GPT-2."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from csv_callback.testing import pydoc_corpus, tiny_gpt2, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return pydoc_corpus()


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=512)


@pytest.fixture
def model(tokenizer):
    """A fresh tiny GPT-2 (2 layers, 64 wide) per test, so tests cannot leak weights into each other."""
    return tiny_gpt2(len(tokenizer))
