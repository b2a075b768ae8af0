"""W&B extras of :class:`~csv_callback.callback.SalienceCallback`: metric definitions, a predictions table,
and an HTML view of the probe text with its most salient tokens highlighted.

The scalar metrics themselves reach W&B through Lightning's ``WandbLogger`` like any logged metric; this
module only adds what a plain scalar cannot show. Every function is a no-op without a ``WandbLogger``.
"""

from __future__ import annotations

import html
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import WandbLogger

from .probe import ProbeSet
from .salience import SalienceVector

# ``name`` tells apart evaluations at one step (``step-N`` in training, ``eval-...`` of other weights after it).
_TABLE_COLUMNS = ["step", "task", "pred", "weighted_loss", "extrapolating", "name"]


def wandb_runs(trainer: pl.Trainer) -> list[Any]:
    """The ``wandb`` runs of the trainer's ``WandbLogger``\\ s (rank 0 only; others hold dummies)."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def define_metrics(trainer: pl.Trainer, summaries: dict[str, str]) -> None:
    """Plot each metric against ``trainer/global_step`` and keep its ``summaries[name]`` (e.g. ``"max"``)."""
    for run in wandb_runs(trainer):
        run.define_metric("trainer/global_step")
        for name, summary in summaries.items():
            run.define_metric(name, step_metric="trainer/global_step", summary=summary)


def log_table(trainer: pl.Trainer, history: list[dict[str, Any]], prefix: str) -> None:
    """Log every prediction so far as one table (W&B tables are immutable, so the whole series each time).

    Logged with ``commit=False``: it joins the history row in which Lightning logs the validation's
    scalars, so it shares their ``trainer/global_step``.
    """
    import wandb

    rows = [[r[c] for c in _TABLE_COLUMNS] for r in sorted(history, key=lambda r: (r["step"], r["name"], r["task"]))]
    for run in wandb_runs(trainer):
        run.log({f"{prefix}/predictions": wandb.Table(columns=_TABLE_COLUMNS, data=rows)}, commit=False)


def log_salience_view(
    trainer: pl.Trainer, vector: SalienceVector, probe: ProbeSet, tokenizer: Any, prefix: str
) -> None:
    """Log :func:`salience_html` of ``vector`` as ``<prefix>/<task>/salience`` (an HTML panel)."""
    import wandb

    page = salience_html(vector, probe, tokenizer)
    for run in wandb_runs(trainer):
        run.log({f"{prefix}/{vector.task}/salience": wandb.Html(page)}, commit=False)


def salience_html(vector: SalienceVector, probe: ProbeSet, tokenizer: Any = None, max_sequences: int = 8) -> str:
    """The ``max_sequences`` probe sequences holding the most salient tokens, as HTML.

    Each scored token's background is red in proportion to its weight (the largest weight is full red) and
    its tooltip shows the weight; unscored context tokens are grey. Tokens are decoded one by one with
    ``tokenizer`` (the probe's own: another raises :class:`~csv_callback.ProbeMismatchError`), or shown as ids
    without one.
    """
    vector.check_probe(probe)
    if tokenizer is not None:
        probe.check_tokenizer(tokenizer)
    w = vector.weights
    so = probe.score_offsets.numpy()
    cum = np.concatenate([[0.0], np.cumsum(w)])
    seq_weight = cum[so[1:]] - cum[so[:-1]]
    seq_peak = np.array([w[a:b].max() if b > a else 0.0 for a, b in zip(so[:-1], so[1:])])
    top = np.argsort(-seq_peak, kind="stable")[:max_sequences]
    w_max = float(w.max()) or 1.0
    parts = [
        f"<h3>{html.escape(vector.task)}: the {len(top)} probe sequences with the most salient tokens</h3>",
        f"<p>{vector.n_tokens} scored tokens; weight of these sequences: {seq_weight[top].sum():.1%}. "
        "Red = salient (darker = larger weight); grey = context, not scored.</p>",
    ]
    for i in top:
        ids, scored = probe.sequence(int(i))
        weights = iter(w[so[i] : so[i + 1]])
        spans = []
        for tok_id, is_scored in zip(ids.tolist(), scored.tolist()):
            text = html.escape(tokenizer.decode([tok_id]) if tokenizer is not None else f"[{tok_id}]")
            if is_scored:
                wt = float(next(weights))
                spans.append(f'<span title="w={wt:.3g}" style="background:rgba(220,0,0,{wt / w_max:.3f})">{text}</span>')
            else:
                spans.append(f'<span style="color:#999">{text}</span>')
        parts.append(
            f"<p style='font-family:monospace;white-space:pre-wrap'><b>#{i} ({seq_weight[i]:.1%})</b> {''.join(spans)}</p>"
        )
    return "\n".join(parts)
