"""Exact per-token losses of a model on a probe set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .probe import ProbeSet

# Rows of float32 log-probabilities materialised at once is this many elements / vocabulary size:
# 2**24 floats = 64 MiB, whatever the vocabulary (a 150k vocabulary gives chunks of ~110 rows).
_CHUNK_ELEMENTS = 2**24


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
                logits = _forward(model, ids.to(device), attn.to(device))
                # The logit at position t predicts the token at t + 1.
                rows, cols = torch.nonzero(score[:, 1:], as_tuple=True)
                targets = ids[rows, cols + 1]
                batch_losses = _nll(logits, rows.to(device), cols.to(device), targets.to(device)).cpu()
                _scatter_rows(out, batch_losses, n_scored[batch], out_start[batch])
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode
    return out


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


def _nll(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 NLL of ``targets`` under ``logits[rows, cols]``, a bounded chunk of rows at a time."""
    chunk = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    out = torch.empty(len(rows), dtype=torch.float32, device=logits.device)
    with torch.autocast(logits.device.type, enabled=False):
        for c in range(0, len(rows), chunk):
            sl = slice(c, c + chunk)
            out[sl] = F.cross_entropy(logits[rows[sl], cols[sl]].float(), targets[sl], reduction="none")
    return out


def _scatter_rows(out: torch.Tensor, batch_losses: torch.Tensor, n_scored: torch.Tensor, starts: torch.Tensor) -> None:
    """Copy each batch row's losses to its slot in ``out``."""
    # nonzero() yields positions row-major, so row r's losses are one contiguous run of n_scored[r].
    pos = 0
    for r in range(len(n_scored)):
        k = int(n_scored[r])
        out[int(starts[r]) : int(starts[r]) + k] = batch_losses[pos : pos + k]
        pos += k
