"""W&B extras of a :class:`~csv_callback.evaluator.SalienceEvaluator`, for any training loop: metric
definitions (a step metric, a ``max``/``min`` summary each), a table of every prediction so far, and an HTML
view of the probe text with each vector's most salient tokens shaded (:func:`salience_html`, the report's
renderer).

The scalar metrics reach W&B however the loop logs metrics (Lightning's ``WandbLogger``, the Trainer's
``WandbCallback``, ``wandb.log``); these functions add what a scalar cannot show. They take ``wandb`` runs
(``wandb.init()``'s result, ``wandb.run``, ``WandbLogger.experiment``) and the evaluator. A plain loop::

    run = wandb.init(mode="offline")
    wandb_view.define_metrics(run, evaluator)
    wandb_view.log_salience_views(run, evaluator, tokenizer, step=0)      # once: the vectors do not change
    ...
    metrics = evaluator.evaluate(model, step, training=True).metrics
    wandb_view.log_predictions_table(run, evaluator, step=step)
    wandb.log(metrics, step=step)

:class:`WandbExtras` is what the Lightning and Hugging Face callbacks use: the same calls, each salience view
once per run, and a failure warns instead of stopping training. ``wandb`` is imported only when a function
logs, so this module can be imported without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .evaluator import SalienceEvaluator
from .probe import ProbeSet
from .report import salience_html
from .salience import SalienceVector

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

__all__ = ["WandbExtras", "define_metrics", "log_predictions_table", "log_salience_views", "salience_html"]

# ``name`` tells apart evaluations at one step (``step-N`` in training, ``eval-...`` of other weights after it);
# ``pred_lo``/``pred_hi`` (the interval at the evaluator's interval_level) and the end-of-run forecast come last so
# that earlier columns keep their positions. A custom chart over this table (x step, y pred with pred_lo..pred_hi,
# or forecast with forecast_lo..forecast_hi, as a band) shows each prediction or forecast with its band over training.
TABLE_COLUMNS = ["step", "task", "pred", "weighted_loss", "extrapolating", "name", "pred_lo", "pred_hi", "forecast",
                 "forecast_lo", "forecast_hi"]


def define_metrics(runs: Run | Sequence[Run], evaluator: SalienceEvaluator, step_metric: str | None = None) -> None:
    """Give each of the evaluator's metrics its summary (``max`` for scores, ``min`` for losses) in ``runs``.

    ``step_metric`` is the metric to plot them against (Lightning's ``trainer/global_step``); ``None`` keeps
    W&B's own step, the one ``wandb.log(..., step=...)`` sets.
    """
    runs = _check(runs, evaluator, "define_metrics")
    if step_metric is not None and (not isinstance(step_metric, str) or not step_metric):
        raise ValueError(f"define_metrics(step_metric=...) must be a metric name or None, got {step_metric!r}.")
    for run in runs:
        if step_metric is not None:
            run.define_metric(step_metric)
        for name, summary in evaluator.metric_summaries().items():
            run.define_metric(name, step_metric=step_metric, summary=summary)


def log_predictions_table(runs: Run | Sequence[Run], evaluator: SalienceEvaluator, step: int | None = None) -> None:
    """Log every prediction so far as ``<prefix>/predictions``, one row per (evaluation, task).

    W&B tables are immutable, so the whole history each time. Logged with ``commit=False``: at ``step`` if
    given (the step of the ``wandb.log`` it joins), else into the next row the loop commits, as Lightning and
    the Trainer log an evaluation's scalars right after.
    """
    runs = _check(runs, evaluator, "log_predictions_table", step)
    import wandb

    history = sorted(evaluator.history, key=lambda r: (r["step"], r["name"], r["task"]))
    rows = [[r[c] for c in TABLE_COLUMNS] for r in history]
    for run in runs:
        run.log({f"{evaluator.prefix}/predictions": wandb.Table(columns=TABLE_COLUMNS, data=rows)}, step=step,
                commit=False)


def log_salience_views(
    runs: Run | Sequence[Run], evaluator: SalienceEvaluator, tokenizer: Any = None, step: int | None = None
) -> None:
    """Log :func:`salience_html` of each vector as ``<prefix>/<task>/salience`` (an HTML panel); call it once
    per run, as the vectors do not change.

    ``tokenizer`` must be the probes' own (:class:`~csv_callback.ProbeMismatchError` otherwise); without one
    tokens are shown as ids. ``step`` as in :func:`log_predictions_table`.
    """
    runs = _check(runs, evaluator, "log_salience_views", step)
    for vector, probe in _vectors(evaluator):
        _log_view(runs, evaluator.prefix, vector, probe, tokenizer, step)


def _vectors(evaluator: SalienceEvaluator) -> list[tuple[SalienceVector, ProbeSet]]:
    return [(v, p) for p in evaluator.probes for v in evaluator.groups[p.fingerprint]]


def _log_view(runs: list[Run], prefix: str, vector: SalienceVector, probe: ProbeSet, tokenizer: Any,
              step: int | None) -> None:
    import wandb

    page = wandb.Html(salience_html(vector, probe, tokenizer))
    for run in runs:
        run.log({f"{prefix}/{vector.task}/salience": page}, step=step, commit=False)


class WandbExtras:
    """The W&B extras of one evaluator inside a training framework: what its callback calls.

    Every failure (a full disk under the run's media, a W&B error) warns with a ``RuntimeWarning`` naming
    what was lost, and the run goes on: hours of training matter more than a table.
    """

    def __init__(self, evaluator: SalienceEvaluator) -> None:
        if not isinstance(evaluator, SalienceEvaluator):
            raise ValueError(f"WandbExtras(evaluator=...) takes a SalienceEvaluator, got {type(evaluator).__name__}.")
        self.evaluator = evaluator
        self._defined: set[str] = set()  # ids of the runs that have the metric definitions
        self._viewed: set[str] = set()  # ids of the runs that have the salience views

    def define_metrics(self, runs: Sequence[Run], step_metric: str | None) -> None:
        """:func:`define_metrics` in each run that does not have them yet."""
        new = [r for r in runs if r.id not in self._defined]
        if new:
            self.evaluator.guard("define the W&B metrics", define_metrics, new, self.evaluator, step_metric)
            self._defined |= {r.id for r in new}

    def after_evaluation(self, runs: Sequence[Run], tokenizer: Any = None) -> None:
        """The predictions table, and in a run that has none yet, the salience views (a failed view is not
        retried: it would fail again). Nothing without vectors: nothing was predicted."""
        if not self.evaluator.vectors or not runs:
            return
        self.evaluator.guard("log the predictions table to W&B", log_predictions_table, runs, self.evaluator)
        new = [r for r in runs if r.id not in self._viewed]
        if new:
            for vector, probe in _vectors(self.evaluator):
                self.evaluator.guard(f"log the salience view of {vector.task!r} to W&B", _log_view, new,
                                     self.evaluator.prefix, vector, probe, tokenizer, None)
            self._viewed |= {r.id for r in new}



def _check(runs: Any, evaluator: Any, where: str, step: Any = None) -> list[Run]:
    """``runs`` as a list of W&B runs, or a ValueError that says what was passed instead."""
    from wandb.sdk.wandb_run import Run

    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ValueError(f"{where}(step=...) must be None or a step number >= 0 (the step of the wandb.log this "
                         f"joins), got {step!r}.")
    if not isinstance(evaluator, SalienceEvaluator):
        raise ValueError(f"{where}(evaluator=...) takes a SalienceEvaluator, got {type(evaluator).__name__}.")
    items = list(runs) if isinstance(runs, (list, tuple)) else [runs]
    bad = [type(r).__name__ for r in items if not isinstance(r, Run)]
    if bad:
        raise ValueError(f"{where}(runs=...) takes W&B runs (what wandb.init() returns, wandb.run, or a "
                         f"WandbLogger's .experiment), got {bad}; is a W&B run active?")
    return items
