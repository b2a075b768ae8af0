"""Fitting salience vectors and the paper's baselines from checkpoints whose scores are known.

The fit solves, for a regularisation strength ``lam``,

    min_{w in simplex, link}  mean_j (link(x_j . w) - y_j)^2  +  lam * KL(w || uniform)

where ``x_j`` ``[n]`` are checkpoint ``j``'s per-token losses and ``y_j`` its score. The KL term pulls the
weights towards plain loss averaging, which ``lam -> inf`` recovers exactly; with m checkpoints << n tokens
it is what keeps the fit from memorising. ``lam`` is chosen by cross-validation over whole groups (runs or
data mixtures), since the question is whether a vector transfers to a mixture it has not seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, least_squares, minimize
from scipy.special import expit, log_softmax
from threadpoolctl import threadpool_limits

from ._checks import as_float_array
from .probe import ProbeMismatchError, ProbeSet
from .salience import SalienceVector, SigmoidLink

# Strengths relative to the score variance (the objective's MSE is divided by it); the largest keeps w
# close to uniform, the smallest barely regularises.
_LAMBDA_GRID = tuple(float(x) for x in np.logspace(0, -4.5, 10))
_STEPS_PER_LAMBDA = 50
_GRAM_BLOCK_ELEMENTS = 2**22


def fit_link(
    loss: Any,
    scores: Any,
    metric: str = "acc",
    anchor: tuple[float, float] | None = None,
    start: tuple[float, float, float, float] | None = None,
) -> SigmoidLink:
    """Least-squares fit of :class:`SigmoidLink` to ``loss`` ``[m]`` -> ``scores`` ``[m]``.

    For ``metric="acc"`` the bounds are the OLMo ladder's step-2 fit: ``hi`` in [0, 1], ``hi - lo`` in
    [0, 1], ``k`` > 0 and ``L0`` >= 0. ``anchor`` adds one
    extra point (e.g. ``(0.0, 1.0)``: zero loss, perfect score). ``start`` is ``(lo, hi, k, L0)``;
    by default the best of a data-driven start and the OLMo ladder's start is kept.
    """
    L = as_float_array(loss, "loss", 1)
    y = as_float_array(scores, "scores", 1)
    if L.shape != y.shape:
        raise ValueError(f"loss and scores must have the same shape, got {L.shape} and {y.shape}.")
    if anchor is not None:
        L, y = np.append(L, anchor[0]), np.append(y, anchor[1])
    lower, upper = _link_bounds(metric)
    starts = [start] if start is not None else _link_starts(L, y, metric)
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
    n_folds: int = 5,
    seed: int = 0,
) -> SalienceVector:
    """Fit token weights and link jointly; choose the regularisation by cross-validation.

    Args:
        losses: ``[m, n]`` per-token losses of m checkpoints on the n scored tokens of one probe.
        scores: ``[m]`` the checkpoints' benchmark scores.
        groups: ``[m]`` labels of the held-out unit (run, data mixture). Each fold holds out whole groups
            (one group per fold up to 10 groups, else ``n_folds`` folds of groups). Without groups,
            random ``n_folds``-fold CV over checkpoints, which flatters every method when checkpoints of
            one run are correlated.
        probe: the probe the losses were computed on; records its fingerprint and answer mask.
        answer_mask: bool ``[n]``, the answer tokens for the "label" baseline (default: the probe's).
        task, metric: names stored in the vector; ``metric="acc"`` requires scores in [0, 1].

    Returns:
        A :class:`SalienceVector` whose ``fit_report`` holds ``cv_mse`` and ``cv_mae`` for ``"csv"``,
        ``"uniform"`` (mean loss + link: loss averaging) and, with an answer mask, ``"label"`` (answer-token
        loss + link), all under the same folds, plus the chosen ``lam`` and the held-out predictions.
        The csv error is honest about the choice of ``lam``: fold f's predictions use the ``lam`` that did
        best on the other folds.
    """
    X, y, fold_of, answer = _validate_fit_inputs(losses, scores, groups, probe, answer_mask, metric, n_folds, seed)
    m, n = X.shape
    lams = list(_LAMBDA_GRID)
    n_f = int(fold_of.max()) + 1
    centred = _centre(X)
    baselines = {"uniform": centred.mean}
    if answer is not None:
        baselines["label"] = X[:, answer].mean(axis=1, dtype=np.float64)

    cv_pred: dict[str, np.ndarray] = {}
    for name, L in baselines.items():
        cv_pred[name] = np.empty(m)
        for f in range(n_f):
            tr = fold_of != f
            cv_pred[name][~tr] = fit_link(L[tr], y[tr], metric)(L[~tr])

    # path_pred[i, j]: prediction for checkpoint j from its fold's fit at lams[i].
    path_pred = np.empty((len(lams), m))
    for f in range(n_f):
        tr = fold_of != f
        for i, state in enumerate(_lambda_path(X, centred, y, tr, lams, metric)):
            path_pred[i, ~tr] = state.link(_matvec(state.w, X[~tr].T))
    fold_mse = np.stack([((path_pred[:, fold_of == f] - y[fold_of == f]) ** 2).mean(axis=1) for f in range(n_f)], 1)
    cv_pred["csv"] = np.empty(m)
    for f in range(n_f):
        others = np.delete(fold_mse, f, axis=1).mean(axis=1)
        cv_pred["csv"][fold_of == f] = path_pred[int(np.argmin(others)), fold_of == f]
    best = int(np.argmin(fold_mse.mean(axis=1)))
    final = _lambda_path(X, centred, y, np.ones(m, bool), lams[: best + 1], metric)[-1]

    wl = _matvec(final.w, X.T)
    report = {
        "lam": lams[best],
        "lam_path": lams,
        "cv_mse_path": fold_mse.mean(axis=1).tolist(),
        "cv_mse": {k: float(np.mean((p - y) ** 2)) for k, p in cv_pred.items()},
        "cv_mae": {k: float(np.mean(np.abs(p - y))) for k, p in cv_pred.items()},
        "cv_pred": {k: p.tolist() for k, p in cv_pred.items()},
        "scores": y.tolist(),
        "folds": fold_of.tolist(),
        "cv": "groups" if groups is not None else "random",
        "train_mse": float(np.mean((final.link(wl) - y) ** 2)),
        "effective_tokens": float(np.exp(-np.sum(final.w * np.log(np.maximum(final.w, 1e-300))))),
        "n_checkpoints": m,
    }
    return SalienceVector(
        weights=final.w,
        link=final.link,
        task=task,
        metric=metric,
        probe_fingerprint=probe.fingerprint if probe is not None else "",
        tokenizer_hash=probe.tokenizer_hash if probe is not None else "",
        loss_range=(float(wl.min()), float(wl.max())),
        fit_report=report,
    )


# ---------------------------------------------------------------------- the joint solver
@dataclass
class _State:
    w: np.ndarray  # float64 [n], on the simplex
    link: SigmoidLink


@dataclass
class _Centred:
    """Each checkpoint's mean loss and the Gram matrix of the row-centred losses.

    Centring is per row, so every fold's training rows are a subset of the same centred rows: one Gram
    product serves all folds' bases (it and the basis products were 30% of the fit's time when done per
    fold), and no centred copy of the whole matrix is kept.
    """

    mean: np.ndarray  # float64 [m]
    gram: np.ndarray  # float64 [m, m]


def _centre(X: np.ndarray) -> _Centred:
    m, n = X.shape
    mean = X.mean(axis=1, dtype=np.float64)
    mu = mean[:, None].astype(X.dtype)
    gram = np.zeros((m, m))
    block = max(1024, _GRAM_BLOCK_ELEMENTS // m)  # columns per block: a bounded float32 temporary
    for a in range(0, n, block):
        Xc = X[:, a : a + block] - mu
        gram += Xc @ Xc.T
    return _Centred(mean=mean, gram=gram)


def _lambda_path(
    X: np.ndarray, centred: _Centred, y: np.ndarray, train: np.ndarray, lams: Sequence[float], metric: str
) -> list[_State]:
    """Solutions for ``lams`` (decreasing) on the rows ``train``, each warm-started from the previous.

    The KL-regularised optimum has ``log w = -X_train^T alpha + const`` for some ``alpha`` (stationarity),
    so the weights are searched in that m-dimensional family, in an orthonormal basis ``B @ Xc_train`` of
    the row space of the row-centred training losses (whitening makes L-BFGS converge in tens, not
    thousands, of steps). Each strength gets a fixed budget of L-BFGS steps: at the weakest strengths the
    objective is nearly flat and running to convergence only overfits, so the budget is part of the
    regularisation.
    """
    mean, y = centred.mean[train], y[train]
    # One copy of the training rows, centred in place: every product reads only them.
    Xc = X[train]
    Xc -= mean[:, None].astype(X.dtype)
    B = _whitening(centred.gram[np.ix_(train, train)], Xc.shape[1])
    r = B.shape[0]
    link = fit_link(mean, y, metric)
    lower, upper = _link_bounds(metric)
    bounds = Bounds(np.concatenate([np.full(r, -np.inf), lower]), np.concatenate([np.full(r, np.inf), upper]))
    # Dividing the MSE by the score variance makes the objective O(1), so lam is relative and L-BFGS's
    # tolerances are scale-free.
    row_w = 1.0 / len(y) / max(float(np.var(y)), 1e-12)
    x = np.concatenate([np.zeros(r), np.clip(_to_params(link.lo, link.hi, link.k, link.L0), lower, upper)])
    states = []
    # One BLAS thread: these matrix-vector products are memory-bound, and idle OpenBLAS threads spin on
    # the second core, halving the speed of everything between them (measured: 26 s vs 54 s, BENCHMARKS.md).
    with threadpool_limits(limits=1, user_api="blas"):
        for lam in lams:
            res = minimize(_objective, x, args=(Xc, B, mean, y, row_w, lam), jac=True, method="L-BFGS-B",
                           bounds=bounds, options={"maxiter": _STEPS_PER_LAMBDA, "ftol": 1e-12, "gtol": 1e-9})
            x = res.x
            states.append(_State(w=np.exp(log_softmax(_matvec(x[:r] @ B, Xc))), link=_to_link(x[r:])))
    return states


def _whitening(gram: np.ndarray, n: int) -> np.ndarray:
    """float64 ``[r, m]`` ``B`` such that the rows of ``B @ Xc`` are orthogonal, span the rows of ``Xc``
    (whose Gram matrix is ``gram``) and have entries O(1)."""
    evals, evecs = np.linalg.eigh(gram)  # [m, m]: cheaper than an SVD of Xc
    keep = evals > evals.max() * 1e-8
    return (evecs[:, keep] / np.sqrt(evals[keep])).T * math.sqrt(n)


def _matvec(a: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``a @ M`` for a float64 vector and a float32 matrix, without upcasting the matrix."""
    return (a.astype(M.dtype) @ M).astype(np.float64)


def _objective(x, Xc, B, mean, y, row_w, lam) -> tuple[float, np.ndarray]:
    """Weighted MSE + lam * KL(w || uniform) and its gradient in (basis coefficients, link params)."""
    r, n = B.shape[0], Xc.shape[1]
    logw = log_softmax(_matvec(x[:r] @ B, Xc))
    w = np.exp(logw)
    L = mean + _matvec(w, Xc.T)  # = X_train @ w, as w sums to 1
    s, ds_dL, ds_dp = _link_eval(x[r:], L, grad=True)
    res = s - y
    f = row_w * float(res @ res) + lam * (float(w @ logw) + math.log(n))
    # d f / d w up to a constant (the row means' part is one), which the simplex projection below removes.
    v = _matvec(2 * row_w * res * ds_dL, Xc) + lam * logw
    g_z = w * (v - w @ v)
    return f, np.concatenate([B @ _matvec(g_z, Xc.T), (2 * row_w * res) @ ds_dp])


# ---------------------------------------------------------------------- link parameterisation
# Optimised as p = (span, L0, k, hi) with lo = hi - span: the OLMo ladder's (a = -span, L0, k, b = hi),
# whose box bounds keep an accuracy curve inside [0, 1] at its low-loss end.
def _link_bounds(metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "acc":
        return np.array([0.0, 0.0, 1e-8, 0.0]), np.array([1.0, np.inf, np.inf, 1.0])
    return np.array([0.0, -np.inf, 1e-8, -np.inf]), np.array([np.inf, np.inf, np.inf, np.inf])


def _to_params(lo: float, hi: float, k: float, L0: float) -> np.ndarray:
    return np.array([hi - lo, L0, k, hi], dtype=np.float64)


def _to_link(p: np.ndarray) -> SigmoidLink:
    span, L0, k, hi = (float(v) for v in p)
    return SigmoidLink(lo=hi - span, hi=hi, k=k, L0=L0)


def _link_starts(L: np.ndarray, y: np.ndarray, metric: str) -> list[tuple[float, float, float, float]]:
    spread = float(np.std(L)) or 1.0
    data = (float(y.min()), float(y.max()), 4.0 / spread, float(np.median(L)))
    if metric != "acc":
        return [data]
    chance = float(np.clip(y.min(), 0.0, 1.0))
    return [data, (chance, 1.0, 3.0, 0.9)]


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
def _validate_fit_inputs(losses, scores, groups, probe, answer_mask, metric, n_folds, seed):
    X = as_float_array(losses, "losses", 2, dtype=np.float32)
    y = as_float_array(scores, "scores", 1)
    m, n = X.shape
    if y.shape != (m,):
        raise ValueError(f"scores has shape {y.shape} but losses has {m} rows (checkpoints); pass one score per row.")
    if m < 3:
        raise ValueError(f"fit_salience needs at least 3 checkpoints, got {m}; a 4-parameter link cannot be fitted.")
    if metric == "acc" and ((y < 0) | (y > 1)).any():
        raise ValueError(
            f"metric 'acc' needs scores in [0, 1], got range [{y.min():.4g}, {y.max():.4g}]; "
            "pass fractions, not percentages, or name another metric."
        )
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
    return X, y, _folds(m, groups, n_folds, seed), answer


def _folds(m: int, groups: Sequence[Any] | None, n_folds: int, seed: int) -> np.ndarray:
    """int ``[m]``: the fold of each checkpoint."""
    if groups is None:
        k = min(n_folds, m)
        fold_of = np.arange(m) % k
        return np.random.default_rng(seed).permutation(fold_of)
    groups = np.asarray(list(groups), dtype=object)
    if groups.shape != (m,):
        raise ValueError(f"groups must have one label per checkpoint ({m}), got {groups.shape[0]}.")
    names, g = np.unique(groups.astype(str), return_inverse=True)
    if len(names) < 2:
        raise ValueError(
            f"groups has a single group ({names[0]!r}); cross-validation over groups needs >= 2. "
            "Pass groups=None for random folds over checkpoints."
        )
    if len(names) <= 10:
        return g
    # Larger groups first, each to the currently smallest fold (balanced group k-fold).
    sizes = np.bincount(g)
    fold_size, fold_of_group = np.zeros(n_folds), np.empty(len(names), int)
    for gi in np.argsort(-sizes, kind="stable"):
        fold_of_group[gi] = int(np.argmin(fold_size))
        fold_size[fold_of_group[gi]] += sizes[gi]
    return fold_of_group[g]
