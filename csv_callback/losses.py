"""Exact per-token losses of a model on a probe set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        sequences: optional int64 indices of the probe sequences to score (e.g. one rank's shard);
            default all.

    Returns:
        float32 ``[probe.n_tokens]`` on the CPU (or, with ``sequences``, the losses of those sequences'
        scored tokens, in the order the indices are given). The log-softmax is computed in float32 even
        when the model runs under autocast or in bf16.

    Sequences are batched longest-first and each batch is right-padded only to its own longest sequence,
    so little compute goes to padding. Causal attention means right padding never changes a real
    position's logits.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    seq_idx = torch.arange(probe.num_sequences) if sequences is None else torch.as_tensor(sequences, dtype=torch.int64)
    lengths = probe.lengths[seq_idx]
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
                logits = _forward(model, ids_dev, attn.to(device))
                for r, j in enumerate(batch):
                    start = int(out_start[j])
                    out[start : start + int(n_scored[j])] = _row_nll(logits[r], ids_dev[r], score[r]).cpu()
                # Free this batch's logits before the next forward allocates its own (2x peak otherwise).
                del logits
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode
    return out


def sequence_loglikelihoods(losses: torch.Tensor, probe: ProbeSet) -> torch.Tensor:
    """float64 ``[probe.num_sequences]``: each sequence's summed log-likelihood of its scored tokens.

    For a probe of (context, continuation) pairs this is lm-eval-harness's ``loglikelihood`` of each
    continuation; multiple-choice accuracy takes the argmax over a question's choices. The sum runs in
    float64 (lm-eval sums float32 log-probabilities in Python floats), so near-ties resolve the same way.
    ``losses``: ``[probe.n_tokens]`` from :func:`token_losses`.
    """
    if losses.shape != (probe.n_tokens,):
        raise ValueError(f"losses must have shape ({probe.n_tokens},) for this probe, got {tuple(losses.shape)}.")
    return -torch.segment_reduce(losses.double(), "sum", lengths=probe.score_offsets.diff())


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


def _forward(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` of an HF causal LM or a plain logits module."""
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
