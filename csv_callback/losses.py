"""Exact per-token losses of a model on a probe set."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import is_integer_tensor
from .probe import ProbeSet

# Rows of float32 log-probabilities materialised at once is this many elements / vocabulary size:
# 2**24 floats = 64 MiB, whatever the vocabulary (a 150k vocabulary gives chunks of ~110 rows).
_CHUNK_ELEMENTS = 2**24
# On a CPU, a large vocabulary's rows go one at a time: one row is enough work for a call, and a one-row
# log-softmax runs without a parallel region, whose barrier stalls whenever another process holds the other
# core (measured with a 150k vocabulary on a loaded 2-core machine: 0.27 s per 2048 rows, steady, against
# 0.3-10 s in chunks of 6-110 rows). A small vocabulary's rows go in chunks of 2**22 floats = 16 MiB, so
# that such stalls are rare.
_CPU_ROW_ELEMENTS = 2**16
_CPU_CHUNK_ELEMENTS = 2**22


def token_losses(
    model: nn.Module,
    probe: ProbeSet,
    batch_size: int = 8,
    sequences: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token negative log-likelihood (natural log) at every scored position of ``probe``.

    Args:
        model: a Hugging Face causal LM (its output has ``.logits``) or any module mapping int64 ids
            ``[B, T]`` to logits ``[B, T, V]``. It is run on its own device, in eval mode, without
            gradients; each submodule's train/eval mode is restored afterwards.
        probe: the probe set.
        batch_size: sequences per forward pass.
        sequences: optional integer indices ``[k]`` (tensor, array or list) of the probe sequences to score,
            e.g. one rank's shard, each in ``[0, probe.num_sequences)``; default all.

    Returns:
        float32 ``[probe.n_tokens]`` on the CPU (or, with ``sequences``, the losses of those sequences'
        scored tokens, in the order the indices are given). The log-softmax is computed in float32 even
        when the model runs under autocast or in bf16.

    Sequences are batched longest-first and each batch is right-padded only to its own longest sequence,
    so little compute goes to padding. Causal attention means right padding never changes a real
    position's logits.

    Raises ValueError when the probe does not fit the model: a token id beyond the vocabulary or a sequence
    longer than the positions the model declares (HF ``config.vocab_size`` / input embedding size,
    ``max_position_embeddings`` / ``n_positions``).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model must be a torch.nn.Module (e.g. a Hugging Face causal LM), got {type(model).__name__}."
        )
    if not isinstance(probe, ProbeSet):
        raise ValueError(f"probe must be a ProbeSet, got {type(probe).__name__}; load a probe file with ProbeSet.load.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    seq_idx = torch.arange(probe.num_sequences) if sequences is None else _sequence_indices(sequences, probe)
    lengths = probe.lengths[seq_idx]
    max_id = int(probe.input_ids.max())
    _check_fits_model(model, max_id, int(lengths.max()) if len(lengths) else 0)
    n_scored = probe.score_offsets.diff()[seq_idx]
    out_start = torch.cumsum(n_scored, 0) - n_scored
    out = torch.empty(int(n_scored.sum()), dtype=torch.float32)

    device = _model_device(model)
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            order = torch.argsort(lengths, descending=True, stable=True)
            for b in range(0, len(order), batch_size):
                batch = order[b : b + batch_size].tolist()
                ids, attn, score = _pad_batch(probe, [int(seq_idx[j]) for j in batch])
                ids_dev = ids.to(device)
                logits = _forward(model, ids_dev, attn.to(device), max_id)
                for r, j in enumerate(batch):
                    start = int(out_start[j])
                    out[start : start + int(n_scored[j])] = _row_nll(logits[r], ids_dev[r], score[r]).cpu()
                # Free this batch's logits before the next forward allocates its own (2x peak otherwise).
                del logits
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode
    return out


def sequence_loglikelihoods(losses: Any, probe: ProbeSet) -> torch.Tensor:
    """float64 ``[probe.num_sequences]``: each sequence's summed log-likelihood of its scored tokens.

    For a probe of (context, continuation) pairs this is lm-eval-harness's ``loglikelihood`` of each
    continuation; multiple-choice accuracy takes the argmax over a question's choices. The sum runs in
    float64 (lm-eval sums float32 log-probabilities in Python floats), so near-ties resolve the same way.
    ``losses``: ``[probe.n_tokens]`` from :func:`token_losses` (a tensor, numpy array or list).
    """
    if not isinstance(probe, ProbeSet):
        raise ValueError(f"probe must be a ProbeSet, got {type(probe).__name__}; load a probe file with ProbeSet.load.")
    try:
        losses = torch.as_tensor(losses)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"losses must be a tensor or array of numbers ({e}); pass the output of token_losses.") from e
    if losses.shape != (probe.n_tokens,):
        raise ValueError(f"losses must have shape ({probe.n_tokens},) for this probe, got {tuple(losses.shape)}.")
    return -torch.segment_reduce(losses.double(), "sum", lengths=probe.score_offsets.diff())


def _sequence_indices(sequences: Any, probe: ProbeSet) -> torch.Tensor:
    """int64 ``[k]``: ``sequences`` checked to be integer indices of the probe's sequences."""
    try:
        idx = torch.as_tensor(sequences)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"sequences must be integer indices of probe sequences, got {sequences!r} ({e}).") from e
    if idx.ndim != 1 or (idx.numel() and not is_integer_tensor(idx)):
        raise ValueError(
            f"sequences must be a 1-D list or tensor of integer sequence indices, got {idx.dtype} of shape "
            f"{tuple(idx.shape)}; e.g. sequences=[0, 2]."
        )
    idx = idx.to(torch.int64)
    bad = (idx < 0) | (idx >= probe.num_sequences)
    if bad.any():
        raise ValueError(
            f"sequences has index {int(idx[bad][0])}, but the probe has {probe.num_sequences} sequences; "
            f"pass indices in [0, {probe.num_sequences - 1}]."
        )
    return idx


def _check_fits_model(model: nn.Module, max_id: int, max_len: int) -> None:
    """Raise ValueError if the model declares a vocabulary without token ``max_id`` or fewer than ``max_len``
    positions; a model that declares neither is checked on its logits instead (see :func:`_forward`)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    # The input embedding's size wins over the config: resize_token_embeddings may leave them apart. Models that
    # are not HF models, or HF models without a base model, have no such embedding to ask.
    with contextlib.suppress(AttributeError, NotImplementedError):
        vocab = model.get_input_embeddings().num_embeddings
    if isinstance(vocab, int) and max_id >= vocab:
        raise ValueError(
            f"the probe has token id {max_id}, but the model's vocabulary has {vocab} entries: the probe was built "
            "with another tokenizer than the model's. Rebuild it with the model's tokenizer."
        )
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and max_len > positions:
        raise ValueError(
            f"the probe has sequences of up to {max_len} tokens, but the model takes at most {positions} positions; "
            f"rebuild the probe with max_length <= {positions}."
        )


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _pad_batch(probe: ProbeSet, seqs: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and score mask ``[B, T_max]`` of the given sequences."""
    parts = [probe.sequence(i) for i in seqs]
    t_max = max(len(ids) for ids, _ in parts)
    ids = torch.zeros(len(parts), t_max, dtype=torch.int64)
    attn = torch.zeros(len(parts), t_max, dtype=torch.int64)
    score = torch.zeros(len(parts), t_max, dtype=torch.bool)
    for r, (seq_ids, seq_score) in enumerate(parts):
        ids[r, : len(seq_ids)] = seq_ids
        attn[r, : len(seq_ids)] = 1
        score[r, : len(seq_ids)] = seq_score
    return ids, attn, score


def _forward(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, max_id: int) -> torch.Tensor:
    """Logits ``[B, T, V]`` of an HF causal LM or a plain logits module; ``V`` must exceed the probe's largest
    token id ``max_id``."""
    if getattr(model, "config", None) is not None and hasattr(model, "get_output_embeddings"):
        out = model(input_ids=ids, attention_mask=attn, use_cache=False)
    else:
        out = model(ids)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != ids.shape:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"the model must return logits of shape [batch, seq, vocab] = [{ids.shape[0]}, {ids.shape[1]}, V] "
            f"(or an output with .logits), got {got}."
        )
    if logits.shape[-1] <= max_id:
        raise ValueError(
            f"the model's logits cover a vocabulary of {logits.shape[-1]}, but the probe has token id {max_id}: the "
            "probe was built with another tokenizer than the model's. Rebuild it with the model's tokenizer."
        )
    return logits


def _row_nll(logits: torch.Tensor, ids: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """float32 NLL ``[n_scored]`` of one sequence's scored tokens, from its logits ``[T, V]`` and ids ``[T]``.

    The logit at position t predicts the token at t + 1. Scored positions form one contiguous span in
    every probe (all of a text, the continuation of a pair), so the span's logits are read in place, a
    bounded chunk of rows at a time, instead of gathered into a copy: no batch x vocab float32 buffer is
    ever allocated.
    """
    pos = torch.nonzero(score[1:]).squeeze(1)
    if len(pos) == 0:
        return torch.empty(0, dtype=torch.float32, device=logits.device)
    first, last = int(pos[0]), int(pos[-1]) + 1
    chunk = _chunk_rows(logits.shape[-1], logits.device)
    nll = torch.empty(last - first, dtype=torch.float32, device=logits.device)
    with torch.autocast(logits.device.type, enabled=False):
        for c in range(first, last, chunk):
            e = min(c + chunk, last)
            nll[c - first : e - first] = F.cross_entropy(logits[c:e].float(), ids[c + 1 : e + 1], reduction="none")
    if len(pos) == last - first:
        return nll
    return nll[(pos - first).to(nll.device)]  # a span with unscored positions inside it


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits per log-softmax call (see _CHUNK_ELEMENTS and _CPU_ROW_ELEMENTS)."""
    if device.type != "cpu":
        return max(1, _CHUNK_ELEMENTS // vocab)
    if vocab >= _CPU_ROW_ELEMENTS:
        return 1
    return max(1, min(_CHUNK_ELEMENTS, _CPU_CHUNK_ELEMENTS) // vocab)
