"""Synthetic checkpoint data with a known salient token subset, for tests and benchmarks.

The world: checkpoints of runs trained on data mixtures that give a share ``s`` of their tokens to one
capability. The capability's (salient) tokens learn with the capability data seen, all other tokens with
the rest, and the benchmark score is a sigmoid of the salient tokens' mean loss. So the mean loss over all
tokens maps to the score differently in every mixture (the paper's failure of loss averaging), while the
salient-weighted loss maps to it the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._extras import extra_imports


@dataclass
class SyntheticLadder:
    """losses ``[m, n]`` float32, scores ``[m]``, groups ``[m]`` (mixture names), salient bool ``[n]``."""

    losses: np.ndarray
    scores: np.ndarray
    groups: np.ndarray
    salient: np.ndarray


def synthetic_ladder(
    n_tokens: int = 2000,
    n_salient: int = 40,
    shares: tuple[float, ...] = (0.05, 0.15, 0.35, 0.6),
    checkpoints_per_mixture: int = 12,
    noise: float = 0.05,
    score_noise: float = 0.005,
    seed: int = 0,
) -> SyntheticLadder:
    rng = np.random.default_rng(seed)
    salient = np.zeros(n_tokens, bool)
    salient[rng.choice(n_tokens, n_salient, replace=False)] = True
    floor = rng.uniform(0.5, 2.0, n_tokens)  # irreducible loss of each token
    amp = rng.uniform(1.0, 4.0, n_tokens)  # what it can learn
    speed = rng.uniform(0.5, 2.0, n_tokens)
    tokens_seen = np.logspace(-1, 1, checkpoints_per_mixture)

    rows, scores, groups = [], [], []
    for share in shares:
        for t in tokens_seen:
            progress = np.where(salient, share * t * 4, (1 - share) * t)
            loss = floor + amp * np.exp(-speed * progress) + noise * rng.standard_normal(n_tokens)
            rows.append(loss)
            sal_loss = loss[salient].mean()
            scores.append(0.25 + 0.7 / (1 + np.exp(3.0 * (sal_loss - 2.6))) + score_noise * rng.standard_normal())
            groups.append(f"mix{share:g}")
    return SyntheticLadder(
        losses=np.asarray(rows, dtype=np.float32),
        scores=np.clip(np.asarray(scores), 0.0, 1.0),
        groups=np.asarray(groups),
        salient=salient,
    )


def pydoc_corpus() -> list[str]:
    """Real English text that ships with every CPython: the pydoc topic pages (about 465k characters)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained locally on ``texts`` (no download).

    Its EOS (``<|endoftext|>``) doubles as the pad token, as in GPT-2.
    """
    with extra_imports("hf", __name__):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_gpt2(vocab_size: int, n_positions: int = 256, n_layer: int = 2, n_embd: int = 64, seed: int = 0):
    """A randomly initialised Hugging Face GPT-2 built from a config (no download)."""
    import torch

    with extra_imports("hf", __name__):
        from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer, n_head=2, n_embd=n_embd,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)
