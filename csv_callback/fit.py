"""Fitting salience vectors and the paper's baselines from checkpoints whose scores are known.

The fit solves, for a regularisation strength ``lam`` and a prior ``p`` over the tokens,

    min_{w in simplex, link}  mean_j (link(x_j . w) - y_j)^2  +  lam * KL(w || p)

where ``x_j`` ``[n]`` are checkpoint ``j``'s per-token losses and ``y_j`` its score. The KL term pulls the
weights towards the prior; with m checkpoints << n tokens it is what keeps the fit from memorising. Two
priors: ``"uniform"``, whose ``lam -> inf`` limit is plain loss averaging (the paper's baseline), and, when
the probe marks answer tokens, ``"answer"``, which puts most of its mass on them, so that its limit is close
to the answer-token loss (the "label" baseline). ``lam`` and the prior are chosen together by
cross-validation over whole groups (runs or data mixtures), since the question is whether a vector
transfers to a mixture it has not seen.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import Bounds, least_squares, minimize
from scipy.special import expit, log_softmax
from threadpoolctl import threadpool_limits

from ._checks import as_float_array, as_float_tuple, require_int, require_str
from .probe import ProbeMismatchError, ProbeSet
from .salience import FRACTION, UNBOUNDED, SalienceVector, SigmoidLink, check_score_range, named_score_range

# Strengths relative to the score variance (the objective's MSE is divided by it); the largest keeps w
# close to uniform, the smallest barely regularises.
_LAMBDA_GRID = tuple(float(x) for x in np.logspace(0, -4.5, 10))
PRIORS = ("uniform", "answer")
# The "answer" prior's share on the answer tokens: its limit is nearly the label baseline, yet every other
# token keeps some prior mass, so the weights can still move anywhere (a share of 1 would pin them to the
# answer tokens for good: log p = -inf elsewhere).
_ANSWER_PRIOR_MASS = 0.9
_STEPS_PER_LAMBDA = 50
_GRAM_BLOCK_ELEMENTS = 2**19  # a 2 MiB float32 temporary per block of the Gram product
# The solver's passes over X: column blocks of 2 MiB of float32, which stay in cache between a block's two
# products (measured at 500 x 1M: CPU per round flat from 1 to 8 MiB blocks, 10% more with 0.5 MiB, where
# numpy's per-call overhead shows), split over this many threads. A constant, not the core count, so that
# a fit's rounding is the same on every machine.
_BLOCK_ELEMENTS = 2**19
_SHARDS = 2
# Fewest (loss, score) points a link is fitted to, the anchor aside. Fewer than its 4 parameters leave the fit
# to the bounds and the start, which is what cross-validating 3 checkpoints (2 per fit) has always meant; one
# point has no slope at all.
_MIN_LINK_POINTS = 2
_DEFAULT_FOLDS = 5


def fit_link(
    loss: Any,
    scores: Any,
    metric: str = "acc",
    anchor: tuple[float, float] | None = None,
    start: tuple[float, float, float, float] | None = None,
    score_range: tuple[float, float] | None = None,
) -> SigmoidLink:
    """Least-squares fit of :class:`SigmoidLink` to ``loss`` ``[m]`` -> ``scores`` ``[m]``, ``m >= 2``.

    The score range is ``score_range`` or, when None, the one :func:`fit_salience` documents (``metric="acc"``
    declares [0, 1]; otherwise scores all within [0, 1] are fractions). Within a bounded range ``(a, b)`` the
    bounds generalise the OLMo ladder's step-2 fit of an accuracy: ``hi`` in [a, b], ``hi - lo`` in
    [0, b - a], ``k`` > 0 and ``L0`` >= 0; an unbounded range leaves ``lo``, ``hi`` and ``L0`` free. ``anchor``
    adds one extra point (e.g. ``(0.0, 1.0)``: zero loss, perfect score). ``start`` is ``(lo, hi, k, L0)``, a
    valid link within those bounds; by default the best of a data-driven start and, for a bounded range, the
    OLMo ladder's start is kept.
    """
    L = as_float_array(loss, "loss", 1)
    y = as_float_array(scores, "scores", 1)
    if L.shape != y.shape:
        raise ValueError(f"loss and scores must have the same shape, got {L.shape} and {y.shape}.")
    if len(L) < _MIN_LINK_POINTS:
        raise ValueError(
            f"fit_link needs at least {_MIN_LINK_POINTS} (loss, score) points besides the anchor, got {len(L)}; "
            "a single point does not determine how the score falls with the loss."
        )
    rng = _score_range(y, metric, score_range)
    anchor = _validate_anchor(anchor, rng)
    return _fit_link(L, y, rng, anchor, None if start is None else _validate_start(start, metric, rng))


def _fit_link(
    L: np.ndarray, y: np.ndarray, rng: tuple[float, float], anchor: tuple[float, float] | None,
    start: tuple[float, float, float, float] | None = None,
) -> SigmoidLink:
    """:func:`fit_link` of inputs already checked: ``L``, ``y`` ``[m]`` and the score range ``rng`` they lie in."""
    if anchor is not None:
        L, y = np.append(L, anchor[0]), np.append(y, anchor[1])
    lower, upper = _link_bounds(rng)
    starts = [start] if start is not None else _link_starts(L, y, rng)
    best = None
    for s in starts:
        p0 = np.clip(_to_params(*s), lower, upper)
        res = least_squares(lambda p: _link_eval(p, L)[0] - y, p0, bounds=(lower, upper), method="trf",
                            jac=lambda p: _link_jac(p, L), x_scale="jac")
        if best is None or res.cost < best.cost:
            best = res
    return _to_link(best.x)


def fit_salience(
    losses: Any,
    scores: Any,
    groups: Sequence[Any] | None = None,
    probe: ProbeSet | None = None,
    answer_mask: Any = None,
    task: str = "task",
    metric: str = "acc",
    n_folds: int | None = None,
    seed: int = 0,
    priors: Sequence[str] | None = None,
    anchor: tuple[float, float] | None = None,
    score_range: tuple[float, float] | None = None,
) -> SalienceVector:
    """Fit token weights and link jointly; choose the regularisation and its prior by cross-validation.

    Args:
        losses: ``[m, n]`` per-token losses of m checkpoints on the n scored tokens of one probe.
        scores: ``[m]`` the checkpoints' benchmark scores.
        groups: ``[m]`` labels of the held-out unit (run, data mixture). Each fold holds out whole groups
            (one group per fold up to 10 groups, else ``n_folds`` folds of groups). Without groups,
            random ``n_folds``-fold CV over checkpoints, which flatters every method when checkpoints of
            one run are correlated. Every fold must leave at least 2 checkpoints to fit on.
        probe: the probe the losses were computed on; records its fingerprint and answer mask. Without it
            the vector has no fingerprint: :meth:`SalienceVector.check_probe` refuses it until its
            ``probe_fingerprint`` is set (after checking that the losses came from that probe).
        answer_mask: bool ``[n]``, the answer tokens for the "label" baseline (default: the probe's).
        task, metric: names stored in the vector; ``metric="acc"`` declares the score range [0, 1] (unless
            ``score_range`` says otherwise), so other scores (e.g. percentages) are an error.
        n_folds: folds when there are more than 10 groups or none: an int >= 2, at most the number of groups
            (or checkpoints, without groups). Default: 5, or one checkpoint per fold with fewer than 5.
        seed: an int >= 0, the seed of the random folds (without groups).
        priors: what the weights are pulled towards, from :data:`PRIORS`: ``"uniform"`` (every scored token
            alike) and ``"answer"`` (``_ANSWER_PRIOR_MASS`` of the mass spread over the answer tokens, the
            rest over the others). Default: both when the answer mask marks some but not all tokens, else
            ``"uniform"``.
        anchor: ``(loss, score)``, one extra point every link (csv's and the baselines') must fit like a
            checkpoint, e.g. ``(0.0, 1.0)``: a model with zero loss scores 1, as the OLMo ladder's step 2
            assumes. It pins the top of the curve when no fitting checkpoint comes near it. Default: none.
            Its score must lie in the score range.
        score_range: ``(lo, hi)``, the scores the metric can take, finite with ``lo < hi``, or
            ``(-inf, inf)`` for an unbounded score; every score must lie in it. It bounds every link (csv's
            and the baselines') as the OLMo ladder bounds an accuracy's: ``hi`` in ``[lo, hi]`` of the range and
            the link's span at most the range's width. Default: [0, 1] for ``metric="acc"``; for any other
            metric [0, 1] when every score lies in [0, 1] (fractions, e.g. ``acc_norm``), else unbounded.
            Pass ``(-inf, inf)`` for a metric whose scores happen to lie in [0, 1] but could leave it.

    Returns:
        A :class:`SalienceVector`, with the score range it was fitted for, whose ``fit_report`` holds ``cv_mse`` and ``cv_mae`` for ``"csv"``,
        ``"uniform"`` (mean loss + link: loss averaging) and, with an answer mask, ``"label"`` (answer-token
        loss + link), all under the same folds, plus the chosen ``prior`` and ``lam`` and the held-out
        predictions. The csv error is honest about those choices: fold f's predictions use the prior and
        ``lam`` that did best on the other folds.
    """
    X, y, rng, fold_of, answer, priors = _validate_fit_inputs(losses, scores, groups, probe, answer_mask, task,
                                                              metric, n_folds, seed, priors, score_range)
    anchor = _validate_anchor(anchor, rng)
    # One BLAS thread per call throughout: the solver splits its products over threads of its own, and
    # OpenBLAS's two threads, spinning while Python works between calls, were slower everywhere and up to
    # 10x slower on a busy machine (the Gram product at 500 x 1M: 17-21 s vs 2.7 s; BENCHMARKS.md).
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit(X, y, rng, fold_of, answer, priors, groups is not None, probe, task, metric, anchor)


def _fit(
    X: np.ndarray, y: np.ndarray, rng: tuple[float, float], fold_of: np.ndarray, answer: np.ndarray | None,
    prior_names: Sequence[str], grouped: bool, probe: ProbeSet | None, task: str, metric: str,
    anchor: tuple[float, float] | None,
) -> SalienceVector:
    m, n = X.shape
    lams = list(_LAMBDA_GRID)
    n_f = int(fold_of.max()) + 1
    centred = _centre(X, answer)
    baselines = {"uniform": centred.mean}
    if answer is not None:
        baselines["label"] = centred.answer_mean
    priors = [_Prior.named(name, answer, n) for name in prior_names]

    cv_pred: dict[str, np.ndarray] = {}
    for name, L in baselines.items():
        cv_pred[name] = np.empty(m)
        for f in range(n_f):
            tr = fold_of != f
            cv_pred[name][~tr] = _fit_link(L[tr], y[tr], rng, anchor)(L[~tr])

    # Per prior, one path per fold plus the final fit's (all rows), all solved together; the final fit at the
    # chosen lam is that path's state there, exactly what a path truncated at that lam would end on.
    trains = [fold_of != f for f in range(n_f)] + [np.ones(m, bool)]
    paths = _solve_paths(X, centred, y, [(tr, pr) for pr in priors for tr in trains], lams, rng, anchor)
    # path_pred[k * len(lams) + i, j]: prediction for checkpoint j from its fold's fit with priors[k] at lams[i].
    path_pred = np.empty((len(priors) * len(lams), m))
    for k in range(len(priors)):
        for f in range(n_f):
            held = fold_of == f
            for i, state in enumerate(paths[k * len(trains) + f]):
                path_pred[k * len(lams) + i, held] = state.link(state.loss[held])
    fold_mse = np.stack([((path_pred[:, fold_of == f] - y[fold_of == f]) ** 2).mean(axis=1) for f in range(n_f)], 1)
    cv_pred["csv"] = np.empty(m)
    for f in range(n_f):
        others = np.delete(fold_mse, f, axis=1).mean(axis=1)
        cv_pred["csv"][fold_of == f] = path_pred[int(np.argmin(others)), fold_of == f]
    best_k, best = divmod(int(np.argmin(fold_mse.mean(axis=1))), len(lams))
    prior = priors[best_k]
    final = paths[best_k * len(trains) + n_f][best]
    weights = np.exp(log_softmax(_matvec(final.coef, X) + prior.log_p(answer, n)))

    wl = _matvec(weights, X.T)
    cv_path = fold_mse.mean(axis=1).reshape(len(priors), len(lams))
    report = {
        "prior": prior.name,
        "anchor": None if anchor is None else list(anchor),
        "lam": lams[best],
        "lam_path": lams,
        "cv_mse_path": {pr.name: row.tolist() for pr, row in zip(priors, cv_path)},
        "cv_mse": {k: float(np.mean((p - y) ** 2)) for k, p in cv_pred.items()},
        "cv_mae": {k: float(np.mean(np.abs(p - y))) for k, p in cv_pred.items()},
        "cv_pred": {k: p.tolist() for k, p in cv_pred.items()},
        "scores": y.tolist(),
        "folds": fold_of.tolist(),
        "cv": "groups" if grouped else "random",
        "train_mse": float(np.mean((final.link(wl) - y) ** 2)),
        "effective_tokens": float(np.exp(-np.sum(weights * np.log(np.maximum(weights, 1e-300))))),
        "n_checkpoints": m,
    }
    sv = SalienceVector(
        weights=weights,
        link=final.link,
        task=task,
        metric=metric,
        probe_fingerprint=probe.fingerprint if probe is not None else "",
        tokenizer_hash=probe.tokenizer_hash if probe is not None else "",
        fit_report=report,
        score_range=rng,
    )
    # The range comes from the vector's own float64 weighted_loss, as the callbacks compute it (a row at a time),
    # not from the solver's float32 products, which put the fitting set's own extremes about 1e-7 outside it.
    seen = [sv.weighted_loss(row) for row in X]  # one float64 row at a time: no float64 copy of X
    return replace(sv, loss_range=(min(seen), max(seen)))


# ---------------------------------------------------------------------- the joint solver
@dataclass(frozen=True)
class _Prior:
    """A prior over the tokens with two levels: ``log p`` is ``log_answer`` on answer tokens and
    ``log_other`` elsewhere (both the same for the uniform prior), so no ``[n]`` array is kept per path."""

    name: str
    log_answer: float
    log_other: float

    @staticmethod
    def named(name: str, answer: np.ndarray | None, n: int) -> _Prior:
        n_answer = 0 if answer is None else int(answer.sum())
        if name == "uniform" or n_answer == n:  # every token an answer: the answer prior is the uniform one
            return _Prior(name, -math.log(n), -math.log(n))
        return _Prior(name, math.log(_ANSWER_PRIOR_MASS / n_answer), math.log((1 - _ANSWER_PRIOR_MASS) / (n - n_answer)))

    def log_p(self, answer: np.ndarray | None, n: int) -> np.ndarray:
        """float64 ``[n]``: ``log p`` of every token."""
        if answer is None or self.log_answer == self.log_other:
            return np.full(n, self.log_other)
        return np.where(answer, self.log_answer, self.log_other)

    def mean_loss(self, centred: _Centred) -> np.ndarray:
        """float64 ``[m]``: each checkpoint's loss averaged under this prior (the weighted loss at ``w = p``)."""
        if centred.answer is None or self.log_answer == self.log_other:
            return centred.mean
        # The other tokens' mean follows from the overall and the answer tokens' means: no pass over X.
        n, n_answer = len(centred.answer), int(centred.answer.sum())
        other_mean = (n * centred.mean - n_answer * centred.answer_mean) / (n - n_answer)
        return _ANSWER_PRIOR_MASS * centred.answer_mean + (1 - _ANSWER_PRIOR_MASS) * other_mean


@dataclass
class _State:
    """A path's solution at one lam: ``w = softmax(coef @ X)``, the link, and ``X @ w`` for every row."""

    coef: np.ndarray  # float64 [m], zero on rows the path does not train on
    link: SigmoidLink
    loss: np.ndarray  # float64 [m]: every checkpoint's weighted loss, held-out rows included


@dataclass
class _Centred:
    """Each checkpoint's mean loss (over all tokens and over the answer tokens) and the Gram matrix of the
    row-centred losses.

    Centring is per row, so the centred Gram of any subset of rows is this matrix restricted to them: one
    product serves every path's basis, and no centred copy of the matrix is ever made (the solver's
    products use X itself, see :class:`_Path`).
    """

    mean: np.ndarray  # float64 [m]
    gram: np.ndarray  # float64 [m, m]
    answer: np.ndarray | None  # bool [n]
    answer_mean: np.ndarray | None  # float64 [m]


def _centre(X: np.ndarray, answer: np.ndarray | None) -> _Centred:
    m, n = X.shape
    mean = X.mean(axis=1, dtype=np.float64)
    answer_mean = None if answer is None else X[:, answer].mean(axis=1, dtype=np.float64)
    mu = mean[:, None].astype(X.dtype)
    gram = np.zeros((m, m))
    block = max(1024, _GRAM_BLOCK_ELEMENTS // m)  # columns per block: a bounded float32 temporary
    for a in range(0, n, block):
        Xc = X[:, a : a + block] - mu
        gram += Xc @ Xc.T
    return _Centred(mean=mean, gram=gram, answer=answer, answer_mean=answer_mean)


class _Path:
    """One regularisation path: solutions for ``lams`` (decreasing) on the rows ``train``, each warm-started
    from the previous.

    The KL-regularised optimum has ``log w = log p - X_train^T alpha + const`` for some ``alpha``
    (stationarity; ``p`` is the path's prior), so the weights are searched in that m-dimensional family, in
    an orthonormal basis ``B @ Xc_train`` of the row space of the row-centred training losses (whitening
    makes L-BFGS converge in tens, not thousands, of steps). Each strength gets a fixed budget of L-BFGS steps: at the weakest strengths the
    objective is nearly flat and running to convergence only overfits, so the budget is part of the
    regularisation.

    No product needs ``Xc_train``: with the basis coefficients scattered into an m-vector that is zero on
    held-out rows, ``a @ Xc_train`` is ``a @ X`` minus a constant (which the softmax ignores), and the
    gradient's ``Xc_train @ g`` is ``(X @ g)[train]`` because ``g`` sums to zero. So every path reads the
    same matrix and :class:`_LockStep` can serve all of them with one pass.
    """

    def __init__(self, centred: _Centred, y: np.ndarray, train: np.ndarray, prior: _Prior, n: int,
                 rng: tuple[float, float], anchor: tuple[float, float] | None) -> None:
        self.train, self.y, self.prior, self.anchor = train, y[train], prior, anchor
        self.y_fit = self.y if anchor is None else np.append(self.y, anchor[1])  # the scores the link fits
        self.B = _whitening(centred.gram[np.ix_(train, train)], n)  # [r, m_train]
        self.r = self.B.shape[0]
        # Dividing the MSE by the score variance makes the objective O(1), so lam is relative and L-BFGS's
        # tolerances are scale-free.
        self.row_w = 1.0 / len(self.y) / max(float(np.var(self.y)), 1e-12)
        # The link at w = p, where the path starts.
        link = _fit_link(prior.mean_loss(centred)[train], self.y, rng, anchor)
        lower, upper = _link_bounds(rng)
        self.bounds = Bounds(np.concatenate([np.full(self.r, -np.inf), lower]),
                             np.concatenate([np.full(self.r, np.inf), upper]))
        self.x0 = np.concatenate([np.zeros(self.r), np.clip(_to_params(link.lo, link.hi, link.k, link.L0), lower, upper)])
        self.last: tuple[np.ndarray, np.ndarray] | None = None  # (x, X @ w) of the latest evaluation

    def coef(self, x: np.ndarray) -> np.ndarray:
        """float64 ``[m]``: ``w = softmax(coef @ X + log p)``, zero on held-out rows."""
        a = np.zeros(len(self.train))
        a[self.train] = x[: self.r] @ self.B
        return a

    def link_terms(self, x: np.ndarray, L: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Given every row's weighted loss ``L`` ``[m]``: the weighted MSE, its derivative in ``L`` (``[m]``,
        zero on held-out rows) and its gradient in the link parameters ``[4]``. The anchor counts as one more
        row whose loss the weights do not move."""
        L_fit = L[self.train] if self.anchor is None else np.append(L[self.train], self.anchor[0])
        s, ds_dL, ds_dp = _link_eval(x[self.r :], L_fit, grad=True)
        res = s - self.y_fit
        dL = np.zeros(len(self.train))
        dL[self.train] = (2 * self.row_w * res * ds_dL)[: len(self.y)]
        return self.row_w * float(res @ res), dL, (2 * self.row_w * res) @ ds_dp

    def run(self, lams: Sequence[float], evaluate: Callable[[np.ndarray, float], tuple[float, np.ndarray, np.ndarray]]) -> list[_State]:
        """The L-BFGS-B path; ``evaluate(x, lam) -> (f, grad, X @ w)`` is this path's objective."""

        def objective(x: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
            f, grad, L = evaluate(x, lam)
            self.last = (x.copy(), L)
            return f, grad

        x, states = self.x0, []
        for lam in lams:
            res = minimize(objective, x, args=(lam,), jac=True, method="L-BFGS-B", bounds=self.bounds,
                           options={"maxiter": _STEPS_PER_LAMBDA, "ftol": 1e-12, "gtol": 1e-9})
            x = res.x
            if self.last is None or not np.array_equal(self.last[0], x):  # L-BFGS-B ended off its last evaluation
                objective(x, lam)
            states.append(_State(coef=self.coef(x), link=_to_link(x[self.r :]), loss=self.last[1]))
        return states


def _solve_paths(
    X: np.ndarray, centred: _Centred, y: np.ndarray, specs: Sequence[tuple[np.ndarray, _Prior]], lams: Sequence[float],
    rng: tuple[float, float], anchor: tuple[float, float] | None,
) -> list[list[_State]]:
    """The path over ``lams`` of each (training-row mask, prior), all solved in lock step (one thread per path)."""
    paths = [_Path(centred, y, tr, prior, X.shape[1], rng, anchor) for tr, prior in specs]
    # The products are split over _SHARDS column ranges in threads of our own (each one BLAS thread, see
    # fit_salience): on these skinny products that beat OpenBLAS's own two threads.
    with ThreadPoolExecutor(_SHARDS) as pool:
        step = _LockStep(X, centred.answer, paths, pool)
        results: list[list[_State]] = [[] for _ in paths]

        def run(p: int) -> None:
            error = None
            try:
                results[p] = paths[p].run(lams, lambda x, lam: step.evaluate(p, x, lam))
            except BaseException as e:  # stops the other paths; re-raised below, in the caller's thread
                error = e
            finally:
                step.finish(p, error)

        threads = [threading.Thread(target=run, args=(p,), daemon=True) for p in range(len(paths))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if step.error is not None:
        raise step.error
    return results


class _Aborted(Exception):
    """Raised in a path's thread when another path's failure stopped the fit."""


class _LockStep:
    """Evaluates the objectives of several paths together: each round takes one request from every path
    still running and answers all of them with two passes over X.

    The products are skinny matrix products, so one product with a column per path costs far less than
    one product per path (measured at 500 x 1M, one thread: 0.19 s for 5 columns vs 5 x 0.06 s). A path's
    objective blocks until every running path has asked (or finished); the last one to arrive computes
    the round. Every round's products have the same columns: one per path (zeros for a finished path) plus
    zero padding to a multiple of 4, so a column's floating-point result never depends on which paths
    happened to be running: the fit is bit-reproducible.

    Pass 1 computes ``z = A^T X + log p - log_other`` (kept, float64 [P, n]; ``log_other``, a path's log
    prior off the answer tokens, is a constant the softmax ignores, so a uniform prior adds nothing) and
    ``X @ w`` with an online softmax (a running max and sum per path, rescaling the accumulated product when
    the max grows); pass 2 computes ``v = C^T X + lam (log w - log p)`` and ``X @ (w * v)``, from which the
    gradient follows. Both go over column blocks small enough to stay in cache, so each reads X from memory
    once, and over ``_SHARDS`` column ranges in parallel, merged in a fixed order.
    """

    def __init__(self, X: np.ndarray, answer: np.ndarray | None, paths: Sequence[_Path], pool: ThreadPoolExecutor) -> None:
        self.X, self.paths, self.pool = X, paths, pool
        self.log_other = np.array([path.prior.log_other for path in paths])
        # log p - log_other is delta on answer tokens, 0 elsewhere: one outer product per block adds it for all
        # paths, and none is needed when every prior is uniform.
        delta = np.array([path.prior.log_answer for path in paths]) - self.log_other
        self.delta, self.answer = (delta, answer.astype(np.float64)) if answer is not None and delta.any() else (None, None)
        m, n = X.shape
        self.block = max(256, _BLOCK_ELEMENTS // m)
        edges = np.linspace(0, -(-n // self.block), _SHARDS + 1).round().astype(int) * self.block
        self.shards = [(int(a), int(min(b, n))) for a, b in zip(edges[:-1], edges[1:]) if a < n]
        # Products with a multiple of 4 columns: OpenBLAS's kernels work in groups of 4, and 8 columns
        # measured 16% faster than 5. The padding columns are zero.
        self.cols = -(-len(paths) // 4) * 4
        self.z = np.empty((len(paths), n))
        self.cond = threading.Condition()
        self.running = set(range(len(paths)))
        self.requests: dict[int, tuple[np.ndarray, float]] = {}
        self.answers: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}
        self.error: BaseException | None = None

    def evaluate(self, p: int, x: np.ndarray, lam: float) -> tuple[float, np.ndarray, np.ndarray]:
        """Path ``p``'s objective at ``x``: ``(f, grad, X @ w)``, answered when every running path has asked."""
        with self.cond:
            self.requests[p] = (x, lam)
            self._round_if_complete()
            while p not in self.answers and self.error is None:
                self.cond.wait()
            if p not in self.answers:
                raise _Aborted from self.error
            return self.answers.pop(p)

    def finish(self, p: int, error: BaseException | None = None) -> None:
        """Path ``p`` is done; an ``error`` (other than the abort it was sent) stops every path."""
        with self.cond:
            self.running.discard(p)
            if error is not None and not isinstance(error, _Aborted) and self.error is None:
                self.error = error
                self.cond.notify_all()
            self._round_if_complete()

    def _round_if_complete(self) -> None:
        if not self.requests or len(self.requests) < len(self.running) or self.error is not None:
            return
        try:
            self.answers.update(self._round(self.requests))
        except BaseException as e:  # the paths waiting for this round raise _Aborted; the caller raises e
            self.error = e
        finally:
            self.requests = {}
            self.cond.notify_all()

    def _round(self, requests: dict[int, tuple[np.ndarray, float]]) -> dict[int, tuple[float, np.ndarray, np.ndarray]]:
        """The objective: weighted MSE + lam * KL(w || p) and its gradient in (basis coefficients,
        link parameters), plus ``X @ w`` ``[m]``, for each requesting path."""
        m, n = self.X.shape
        P = len(self.paths)
        A, C, lam = np.zeros((self.cols, m), self.X.dtype), np.zeros((self.cols, m), self.X.dtype), np.zeros(P)
        for p, (x, lam[p]) in requests.items():
            A[p] = self.paths[p].coef(x)
        lse, Lw = self._pass1(A)  # log-sum-exp [P], X @ w [m, P]
        fit = {}
        for p, (x, _) in requests.items():
            fit[p] = self.paths[p].link_terms(x, Lw[:, p])
            C[p] = fit[p][1]
        wv, kl, Xwv = self._pass2(C, lse, lam)
        # d f / d z = w * (v - w.v) with v = d f / d w; constants in v (the row means' part of C^T X) cancel.
        Xg = Xwv - wv * Lw
        out = {}
        for p in requests:
            path, (mse, _, g_link) = self.paths[p], fit[p]
            f = mse + lam[p] * kl[p]
            out[p] = (f, np.concatenate([path.B @ Xg[path.train, p], g_link]), Lw[:, p].copy())
        return out

    def _pass1(self, At: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``z = At @ X + log p - log_other`` into ``self.z``; returns log-sum-exp ``[P]`` and ``X @ softmax(z)``
        ``[m, P]``."""
        P = len(self.paths)

        def shard(lo: int, hi: int):
            top, total, acc = np.full(P, -np.inf), np.zeros(P), np.zeros((self.X.shape[0], P))
            e = np.zeros((self.cols, self.block), self.X.dtype)  # padding rows stay zero
            for a, Xb in self._blocks(lo, hi):
                zb = self.z[:, a : a + Xb.shape[1]]
                zb[:] = (At @ Xb)[:P]
                if self.delta is not None:
                    zb += self._prior_excess(a, a + Xb.shape[1])
                new_top = np.maximum(top, zb.max(axis=1))
                rescale = np.exp(top - new_top)
                eb = np.exp(zb - new_top[:, None])
                total = total * rescale + eb.sum(axis=1)
                e[:P, : Xb.shape[1]] = eb
                acc = acc * rescale + (Xb @ e[:, : Xb.shape[1]].T)[:, :P]
                top = new_top
            return top, total, acc

        parts = list(self.pool.map(lambda s: shard(*s), self.shards))
        top = np.max([t for t, _, _ in parts], axis=0)
        total = sum(s * np.exp(t - top) for t, s, _ in parts)
        acc = sum(a * np.exp(t - top) for t, _, a in parts)
        return top + np.log(total), acc / total

    def _pass2(self, Ct: np.ndarray, lse: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """With ``v = Ct @ X + lam (log w - log p)``: ``w . v`` ``[P]``, ``KL(w || p)`` ``[P]`` and ``X @ (w * v)``
        ``[m, P]``."""
        P = len(self.paths)

        def shard(lo: int, hi: int):
            wv, kl, acc = np.zeros(P), np.zeros(P), np.zeros((self.X.shape[0], P))
            e = np.zeros((self.cols, self.block), self.X.dtype)
            for a, Xb in self._blocks(lo, hi):
                zb = self.z[:, a : a + Xb.shape[1]]
                w = np.exp(zb - lse[:, None])
                log_ratio = zb - (lse + self.log_other)[:, None]  # log w - log p ...
                if self.delta is not None:
                    log_ratio -= self._prior_excess(a, a + Xb.shape[1])  # ... on the answer tokens too
                wvb = w * ((Ct @ Xb)[:P] + lam[:, None] * log_ratio)
                wv += wvb.sum(axis=1)
                kl += (w * log_ratio).sum(axis=1)
                e[:P, : Xb.shape[1]] = wvb
                acc += (Xb @ e[:, : Xb.shape[1]].T)[:, :P]
            return wv, kl, acc

        parts = list(self.pool.map(lambda s: shard(*s), self.shards))
        return tuple(sum(part[i] for part in parts) for i in range(3))

    def _prior_excess(self, lo: int, hi: int) -> np.ndarray:
        """float64 ``[P, hi - lo]``: each path's ``log p - log_other`` on tokens ``lo:hi``."""
        return np.outer(self.delta, self.answer[lo:hi])

    def _blocks(self, lo: int, hi: int):
        for a in range(lo, hi, self.block):
            yield a, self.X[:, a : min(a + self.block, hi)]


def _whitening(gram: np.ndarray, n: int) -> np.ndarray:
    """float64 ``[r, m]`` ``B`` such that the rows of ``B @ Xc`` are orthogonal, span the rows of ``Xc``
    (whose Gram matrix is ``gram``) and have entries O(1)."""
    evals, evecs = np.linalg.eigh(gram)  # [m, m]: cheaper than an SVD of Xc
    keep = evals > evals.max() * 1e-8
    return (evecs[:, keep] / np.sqrt(evals[keep])).T * math.sqrt(n)


def _matvec(a: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``a @ M`` for a float64 vector and a float32 matrix, without upcasting the matrix."""
    return (a.astype(M.dtype) @ M).astype(np.float64)


# ---------------------------------------------------------------------- link parameterisation
# Optimised as p = (span, L0, k, hi) with lo = hi - span: the OLMo ladder's (a = -span, L0, k, b = hi),
# whose box bounds keep an accuracy curve inside [0, 1] at its low-loss end; a bounded score range (a, b)
# scales that box (for (0, 1) it is the ladder's, to the bit).
def _link_bounds(rng: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = rng
    if rng != UNBOUNDED:
        return np.array([0.0, 0.0, 1e-8, a]), np.array([b - a, np.inf, np.inf, b])
    return np.array([0.0, -np.inf, 1e-8, -np.inf]), np.array([np.inf, np.inf, np.inf, np.inf])


def _to_params(lo: float, hi: float, k: float, L0: float) -> np.ndarray:
    return np.array([hi - lo, L0, k, hi], dtype=np.float64)


def _to_link(p: np.ndarray) -> SigmoidLink:
    span, L0, k, hi = (float(v) for v in p)
    return SigmoidLink(lo=hi - span, hi=hi, k=k, L0=L0)


def _link_starts(L: np.ndarray, y: np.ndarray, rng: tuple[float, float]) -> list[tuple[float, float, float, float]]:
    spread = float(np.std(L)) or 1.0
    data = (float(y.min()), float(y.max()), 4.0 / spread, float(np.median(L)))
    if rng == UNBOUNDED:
        return [data]
    a, b = rng
    chance = float(np.clip(y.min(), a, b))
    return [data, (chance, b, 3.0, 0.9)]


def _link_eval(p: np.ndarray, L: np.ndarray, grad: bool = False):
    """Scores ``[m]``; with ``grad`` also d score / d L ``[m]`` and d score / d p ``[m, 4]``."""
    span, L0, k, hi = p
    sig = expit(-k * (L - L0))
    s = hi - span * (1.0 - sig)
    if not grad:
        return s, None, None
    d = span * sig * (1.0 - sig)  # d s / d u, u = -k (L - L0)
    ds_dp = np.stack([sig - 1.0, d * k, -d * (L - L0), np.ones_like(L)], axis=1)
    return s, -d * k, ds_dp


def _link_jac(p: np.ndarray, L: np.ndarray) -> np.ndarray:
    return _link_eval(p, L, grad=True)[2]


# ---------------------------------------------------------------------- validation and folds
def _validate_fit_inputs(losses, scores, groups, probe, answer_mask, task, metric, n_folds, seed, priors, score_range):
    require_str(task, "task")
    if n_folds is not None:
        require_int(n_folds, "n_folds", 2)
    require_int(seed, "seed", 0)
    if probe is not None and not isinstance(probe, ProbeSet):
        raise ValueError(f"probe must be a ProbeSet, got {type(probe).__name__}; load a probe file with ProbeSet.load.")
    X = as_float_array(losses, "losses", 2, dtype=np.float32)
    y = as_float_array(scores, "scores", 1)
    m, n = X.shape
    if y.shape != (m,):
        raise ValueError(f"scores has shape {y.shape} but losses has {m} rows (checkpoints); pass one score per row.")
    if m < _MIN_LINK_POINTS + 1:
        raise ValueError(
            f"fit_salience needs at least {_MIN_LINK_POINTS + 1} checkpoints, got {m}: cross-validation holds "
            f"checkpoints out and each link is fitted to at least {_MIN_LINK_POINTS}."
        )
    rng = _score_range(y, metric, score_range)
    if probe is not None and probe.n_tokens != n:
        raise ProbeMismatchError(
            f"losses have {n} tokens per row but the probe {probe.fingerprint} has {probe.n_tokens}; "
            "the losses were computed on a different probe."
        )
    if answer_mask is None and probe is not None:
        answer_mask = probe.answer_mask
    answer = None
    if answer_mask is not None:
        answer = np.asarray(answer_mask.numpy() if hasattr(answer_mask, "numpy") else answer_mask)
        if answer.dtype != bool or answer.shape != (n,):
            raise ValueError(f"answer_mask must be bool of shape ({n},), got {answer.dtype} {answer.shape}.")
        if not answer.any():
            answer = None  # a plain-text probe has no answer tokens: no "label" baseline
    return X, y, rng, _folds(m, groups, n_folds, seed), answer, _prior_names(priors, answer)


def _score_range(y: np.ndarray, metric: str, declared: Any) -> tuple[float, float]:
    """The score range of scores ``y`` ``[m]`` of ``metric`` (a name): ``declared``, else the one the metric's
    name declares, else inferred: [0, 1] when every score lies in it, else unbounded. Scores outside a declared
    range are an error."""
    require_str(metric, "metric")
    if declared is not None:
        rng, source = check_score_range(declared), f"score_range={declared!r}"
    else:
        rng, source = named_score_range(metric), f"metric {metric!r}"
        if rng is None:
            return FRACTION if ((y >= 0) & (y <= 1)).all() else UNBOUNDED
    a, b = rng
    if ((y < a) | (y > b)).any():
        raise ValueError(
            f"{source} needs scores in [{a:g}, {b:g}], got range [{y.min():.4g}, {y.max():.4g}]; pass fractions, "
            "not percentages, or declare the range the scores can take with score_range=(lo, hi) (fit "
            "--score-range LO HI)."
        )
    return rng


def _validate_start(start: Any, metric: str, rng: tuple[float, float]) -> tuple[float, float, float, float]:
    """``start`` as ``(lo, hi, k, L0)``: a valid link inside the bounds of score range ``rng``, which least
    squares requires."""
    lo, hi, k, L0 = as_float_tuple(start, "start", 4, "a (lo, hi, k, L0) tuple of 4 numbers")
    try:
        SigmoidLink(lo, hi, k, L0)
    except ValueError as e:
        raise ValueError(f"start={start!r} is not a valid link: {e}") from None
    lower, upper = _link_bounds(rng)
    p = _to_params(lo, hi, k, L0)
    outside = [f"{name}={v:.4g} not in [{a:g}, {b:g}]"
               for name, v, a, b in zip(("hi - lo", "L0", "k", "hi"), p, lower, upper) if not a <= v <= b]
    if outside:
        raise ValueError(f"start={start!r} is outside the bounds of metric {metric!r}: {'; '.join(outside)} "
                         f"(score range [{rng[0]:g}, {rng[1]:g}]).")
    return lo, hi, k, L0


def _validate_anchor(anchor: Any, rng: tuple[float, float]) -> tuple[float, float] | None:
    """``anchor`` as a ``(loss, score)`` pair, its score in the score range ``rng``."""
    if anchor is None:
        return None
    loss, score = as_float_tuple(anchor, "anchor", 2, "a (loss, score) pair of numbers, e.g. (0.0, 1.0)")
    if not (math.isfinite(loss) and math.isfinite(score)) or loss < 0:
        raise ValueError(f"anchor must be a finite loss >= 0 and a finite score, got {anchor!r}.")
    if not rng[0] <= score <= rng[1]:
        raise ValueError(f"the anchor's score must be in [{rng[0]:g}, {rng[1]:g}], the score range, got {score}; "
                         "pass one the metric can take, or declare its range with score_range=(lo, hi).")
    return loss, score


def _prior_names(priors: Sequence[str] | None, answer: np.ndarray | None) -> tuple[str, ...]:
    # With every token an answer, the "answer" prior is the uniform one: fitting it again would only cost time.
    proper_subset = answer is not None and not answer.all()
    if priors is None:
        return PRIORS if proper_subset else ("uniform",)
    try:
        names = tuple(priors) if not isinstance(priors, str) else (priors,)
    except TypeError:  # not iterable
        names = (priors,)
    unknown = [p for p in names if p not in PRIORS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"priors must be distinct names from {PRIORS}, got {list(names)}.")
    if "answer" in names and answer is None:
        raise ValueError("the 'answer' prior needs answer tokens: pass answer_mask, or a probe built with "
                         "ProbeSet.from_pairs, or use priors=('uniform',).")
    return names


def _folds(m: int, groups: Sequence[Any] | None, n_folds: int | None, seed: int) -> np.ndarray:
    """int ``[m]``: the fold of each checkpoint, every fold leaving at least ``_MIN_LINK_POINTS`` to fit on."""
    if groups is None:
        k = _fold_count(n_folds, m, "checkpoint")
        fold_of = np.random.default_rng(seed).permutation(np.arange(m) % k)
    else:
        labels = _group_labels(m, groups)
        fold_of = _group_folds(labels, n_folds)
    held = np.bincount(fold_of)
    f = int(np.argmax(held))
    if m - held[f] < _MIN_LINK_POINTS:
        held_out = "" if groups is None else f" (group(s) {sorted({str(x) for x in labels[fold_of == f]})})"
        raise ValueError(
            f"cross-validation fold {f} holds out {held[f]} of the {m} checkpoints{held_out}, leaving {m - held[f]} "
            f"to fit on; every fit needs at least {_MIN_LINK_POINTS}. Add checkpoints, or split them into more, "
            "smaller folds or groups."
        )
    return fold_of


def _group_labels(m: int, groups: Any) -> np.ndarray:
    """str ``[m]``: ``groups`` checked to hold one label per checkpoint."""
    if isinstance(groups, (str, bytes)):  # a str is iterable: its characters would become the labels
        raise ValueError(
            f"groups is a single str {groups[:30]!r}; pass one label per checkpoint, e.g. a list of run names."
        )
    try:
        labels = np.asarray(list(groups), dtype=object)
    except TypeError:  # not iterable
        raise ValueError(f"groups must be a sequence of one label per checkpoint ({m}), got {groups!r}.") from None
    if labels.shape != (m,):
        raise ValueError(f"groups must have one label per checkpoint ({m}), got {labels.shape[0]}.")
    return labels.astype(str)


def _group_folds(labels: np.ndarray, n_folds: int | None) -> np.ndarray:
    """int ``[m]``: folds holding out whole groups of ``labels`` ``[m]``, one group per fold up to 10 groups."""
    names, g = np.unique(labels, return_inverse=True)
    if len(names) < 2:
        raise ValueError(
            f"groups has a single group ({str(names[0])!r}); cross-validation over groups needs >= 2. "
            "Pass groups=None for random folds over checkpoints."
        )
    if len(names) <= 10:
        return g
    # Larger groups first, each to the currently smallest fold (balanced group k-fold).
    sizes = np.bincount(g)
    fold_size, fold_of_group = np.zeros(_fold_count(n_folds, len(names), "group")), np.empty(len(names), int)
    for gi in np.argsort(-sizes, kind="stable"):
        fold_of_group[gi] = int(np.argmin(fold_size))
        fold_size[fold_of_group[gi]] += sizes[gi]
    return fold_of_group[g]


def _fold_count(n_folds: int | None, units: int, unit: str) -> int:
    """How many folds to split ``units`` items (each a ``unit``) into: ``n_folds`` (already checked to be an int
    >= 2) or the default, and never more than one item per fold."""
    if n_folds is None:
        return min(_DEFAULT_FOLDS, units)
    if n_folds > units:
        raise ValueError(
            f"n_folds={n_folds} is more than the {units} {unit}s to split into folds; pass n_folds <= {units} "
            f"(n_folds={units} holds out one {unit} per fold)."
        )
    return n_folds
