"""The fault policy both training callbacks share (``callback.SalienceCallback``, ``hf.SalienceTrainerCallback``).

What can be checked before training raises there, with the fix in the message (no compute is lost yet);
inside a training run every fault warns and training goes on. Kept free of Lightning so that the Hugging Face
callback does not need it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .losses import token_losses
from .probe import ProbeMismatchError, ProbeSet
from .salience import SalienceVector
from .store import LossStore


def check_scores_probe(model: nn.Module, probe: ProbeSet, owner: str, where: str, hint: str = "") -> None:
    """Raise ValueError if ``model`` cannot score ``probe``; called before the first training step.

    Scores two sequences, batch 1: the probe's longest and the one holding its largest token id. Between
    them they reach every position and every token id an evaluation will feed the model, so the model's
    context window and vocabulary are checked for the price of two short forwards (``token_losses`` itself
    compares them with what an HF ``model.config`` declares before any forward, and names the limit), as is
    a model that returns no logits. Later evaluations can then fail only if the model changes or runs out
    of memory.
    """
    longest = int(probe.lengths.max())
    top_id = int(probe.input_ids.max())
    holder = int(torch.searchsorted(probe.offsets, int(torch.argmax(probe.input_ids)), right=True)) - 1
    sequences = torch.tensor(sorted({int(torch.argmax(probe.lengths)), holder}))
    try:
        token_losses(model, probe, batch_size=1, sequences=sequences)
    except Exception as e:  # any failure here means the model cannot score this probe at all
        raise ValueError(
            f"{owner} cannot compute the probe's token losses with {where} ({type(e).__name__}: {e}); tried on the "
            f"longest sequence of probe {probe.fingerprint} ({longest} tokens) and the one holding its largest token "
            f"id ({top_id}). The model must map int64 token ids [B, T] to logits [B, T, V] (or return an output with "
            f".logits) for sequences that long and ids that large: if its context window is shorter than {longest} "
            "tokens, rebuild the probe with a smaller max_length; if its vocabulary is smaller, build the probe with "
            "the model's own tokenizer" + (f"; {hint}." if hint else ".")
        ) from e


def open_loss_store(root: Path, probe: ProbeSet, owner: str, save_dir: str | os.PathLike) -> LossStore:
    """The loss store of ``probe`` at ``root``; raised before training, a bad ``save_dir`` costs no compute."""
    try:
        return LossStore(root, probe)
    except ProbeMismatchError as e:
        raise ProbeMismatchError(f"{owner}(save_dir={str(save_dir)!r}): {e}") from e
    except (OSError, ValueError) as e:  # not a directory, not writable, or a corrupt probe file in it
        raise ValueError(
            f"{owner}(save_dir={str(save_dir)!r}) cannot be used ({e}); pass a writable directory (a new one for a "
            "new probe) or save_dir=None."
        ) from e


def loss_summary(losses: torch.Tensor | None) -> tuple[float, float]:
    """(mean, count of NaN/inf) of ``losses`` ``[n_tokens]``; both NaN when the losses could not be computed."""
    if losses is None:
        return math.nan, math.nan
    return float(losses.double().mean()), float((~torch.isfinite(losses)).sum())


def usable(losses: torch.Tensor | None, n_bad: float) -> torch.Tensor | None:
    """``losses`` if they were computed and are all finite (``n_bad`` from :func:`loss_summary` is 0), else None."""
    return losses if n_bad == 0 else None


def prediction(vector: SalienceVector, losses: torch.Tensor | None) -> tuple[float, float, bool]:
    """(predicted score, weighted loss, extrapolating) of ``vector`` on finite ``losses`` ``[n_tokens]``.

    ``losses`` is None when they could not be computed or hold NaN/inf (see :func:`usable`): then the score
    and weighted loss are NaN and ``extrapolating`` is True, so a missing prediction never reads as a
    confident one inside the fitted range.
    """
    if losses is None:
        return math.nan, math.nan, True
    wl = float(vector.weighted_loss(losses))
    return float(vector.link(wl)), wl, bool(vector.extrapolates(wl))


def losses_failed_message(owner: str, probe: ProbeSet, step: int, error: Exception) -> str:
    return (
        f"{owner} could not compute the token losses of probe {probe.fingerprint} at step {step} "
        f"({type(error).__name__}: {error}); this evaluation's predictions are skipped (logged as NaN with "
        "extrapolating=1.0, no losses saved) and training continues."
    )


def nonfinite_message(owner: str, n_bad: int, probe: ProbeSet, step: int, counter: str) -> str:
    return (
        f"{owner}: {n_bad} of {probe.n_tokens} probe token losses are NaN/inf at step {step} (has the model "
        "diverged?); the predictions are logged as NaN with extrapolating=1.0, these losses are not saved, and "
        f"{counter} counts them. A training run goes on, though early stopping that monitors a prediction may stop it."
    )


def guarded(what: str, fn: Callable[[], Any], owner: str, warn: Callable[[str], None]) -> None:
    """Run a side output; a failure (full disk, logger error) warns instead of killing the training run."""
    try:
        fn()
    except Exception as e:  # hours of training matter more than one lost side output
        warn(f"{owner} could not {what} ({type(e).__name__}: {e}); training continues.")
