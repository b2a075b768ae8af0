"""Shared real components: a BPE tokenizer trained locally on CPython's pydoc pages and a tiny HF GPT-2; and
the data kept beside the clone (``../shared``), which CI has and a user's clone does not."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from csv_callback import ProbeSet
from csv_callback.store import LossStore
from csv_callback.testing import pydoc_corpus, tiny_gpt2, train_tokenizer


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


SHARED = Path(__file__).resolve().parents[2] / "shared"


def in_ci() -> bool:
    """Whether the CI variable is set the way CI services set it (``true`` in any case, ``1`` or ``yes``)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def shared_file() -> Callable[[str], Path]:
    """``shared_file("data/x.json")``: that file of the data beside the clone (``../shared``).

    Missing, it skips the test outside CI, saying what is needed and where; in CI the data is part of the
    setup, so a missing file fails the test: a skip there would pass a run that tested nothing.
    """

    def find(relative: str) -> Path:
        path = SHARED / relative
        if path.is_file():
            return path
        need = f"needs the shared data, expected at {path} (a directory 'shared' beside the clone)"
        if in_ci():
            pytest.fail(f"CI={os.environ['CI']!r}: this test {need}; CI must provide it", pytrace=False)
        pytest.skip(f"{need}; it is there in CI, not in a plain clone")

    return find


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], ModuleType]:
    """``benchmark_script("olmo_link.py")``: that script under ``benchmarks/`` loaded as a module, so that the
    evidence tests run the benchmarks' own code (``benchmarks/`` is not a package)."""

    def load(relative: str) -> ModuleType:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / relative
        spec = importlib.util.spec_from_file_location(relative.removesuffix(".py").replace("/", "_"), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def probe(tokenizer) -> ProbeSet:
    """A one-text probe of a few dozen tokens (the loss store tests'; modules with their own probe override it)."""
    return ProbeSet.from_texts(["A short probe text for the loss store tests, a few dozen tokens long."], tokenizer, 32)


@pytest.fixture
def store(tmp_path, probe) -> LossStore:
    """A store of three checkpoints whose losses are all 1, 2 and 3."""
    st = LossStore(tmp_path / "store", probe)
    for i in range(3):
        st.write(f"step-{i}", np.full(probe.n_tokens, 1.0 + i, np.float32), step=i)
    return st
