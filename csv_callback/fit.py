"""Fitting salience vectors and the paper's baselines from checkpoints whose scores are known.

The fit solves, for a regularisation strength ``lam`` and a prior ``p`` over the tokens,

    min_{w in simplex, link}  mean_j (link(x_j . w) - y_j)^2  +  lam * KL(w || p)

where ``x_j`` ``[n]`` are checkpoint ``j``'s per-token losses and ``y_j`` its score. The KL term pulls the
weights towards the prior; with m checkpoints << n tokens it is what keeps the fit from memorising. Two
priors: ``"uniform"``, whose ``lam -> inf`` limit is plain loss averaging (the paper's baseline), and, when
the probe marks answer tokens, ``"answer"``, which puts most of its mass on them, so that its limit is close
to the answer-token loss (the "label" baseline). When nothing marks them (plain text), ``"screened"`` priors
put that mass on the tokens that each training set's own checkpoints single out (see
:func:`_screened_priors`). ``lam`` and the prior are chosen together by cross-validation over whole groups
(runs or data mixtures), since the question is whether a vector transfers to a mixture it has not seen;
the baselines these priors nest, loss averaging and (with marks) the answer tokens' loss, are candidates too.

This module checks the input, makes the folds, fits the links (the baselines' and each path's start) and
chooses ``lam`` and the prior; :mod:`csv_callback.solver` solves the regularisation paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from scipy.optimize import least_squares
from scipy.special import log_softmax
from scipy.stats import rankdata
from threadpoolctl import threadpool_limits

from ._checks import as_float_array, as_float_tuple, require_int, require_str
from .probe import ProbeMismatchError, ProbeSet
from .salience import (
    FRACTION,
    INTERVAL_KEY,
    INTERVAL_METHOD,
    UNBOUNDED,
    SalienceVector,
    SigmoidLink,
    check_domain_names,
    check_score_range,
    link_bounds,
    link_curve,
    named_score_range,
)
from .solver import Centred, Prior, State, centre, matvec, solve_paths

# Strengths relative to the score variance (the objective's MSE is divided by it); the largest keeps w
# close to uniform, the smallest barely regularises.
_LAMBDA_GRID = tuple(float(x) for x in np.logspace(0, -4.5, 10))
PRIORS = ("uniform", "answer", "screened")
# The screens (_screened_priors): a statistic and the share of the probe's tokens (at least _MIN_SCREENED) that
# get ANSWER_PRIOR_MASS. Few of them, since each adds a path per fold and a choice to the cross-validation; the
# shares are the two that did best for their statistic on the ladder (3.5% is the 300 of 8,557 tokens).
_SCREENS = (("rank", 0.035), ("residual", 0.01))
_MIN_SCREENED = 10
_SCREEN_BLOCK_ELEMENTS = 2**19  # float32 columns per block of the screening products: bounded temporaries
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
    start: SigmoidLink | None = None,
) -> SigmoidLink:
    """:func:`fit_link` of inputs already checked: ``L``, ``y`` ``[m]`` and the score range ``rng`` they lie in."""
    if anchor is not None:
        L, y = np.append(L, anchor[0]), np.append(y, anchor[1])
    lower, upper = link_bounds(rng)
    starts = [start] if start is not None else _link_starts(L, y, rng)
    best = None
    for s in starts:
        p0 = np.clip(s.params, lower, upper)
        res = least_squares(lambda p: link_curve(p, L)[0] - y, p0, bounds=(lower, upper), method="trf",
                            jac=lambda p: link_curve(p, L, grad=True)[2], x_scale="jac")
        if best is None or res.cost < best.cost:
            best = res
    return SigmoidLink.from_params(best.x)


def _link_starts(L: np.ndarray, y: np.ndarray, rng: tuple[float, float]) -> list[SigmoidLink]:
    """Where least squares starts from: a link through the data's range and, for a bounded score range, the OLMo
    ladder's start (from the lowest score, clipped to the range, to the range's top; k = 3, L0 = 0.9)."""
    spread = float(np.std(L)) or 1.0
    data = SigmoidLink(float(y.min()), float(y.max()), 4.0 / spread, float(np.median(L)))
    if rng == UNBOUNDED:
        return [data]
    a, b = rng
    chance = float(np.clip(y.min(), a, b))
    return [data, SigmoidLink(chance, b, 3.0, 0.9)]


# The options of fit_salience beyond the data, which fit_store.fit_from_store passes through.
FIT_OPTIONS = ("n_folds", "seed", "priors", "anchor", "score_range")


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
    domains: Sequence[str] | None = None,
) -> SalienceVector:
    """Fit token weights and link jointly; choose the regularisation and its prior by cross-validation.

    Args:
        losses: ``[m, n]`` per-token losses of m checkpoints on the n scored tokens of one probe; for a domain
            vector (``domains``), the mean losses of m checkpoints on n validation domains.
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
            alike) and ``"answer"`` (:data:`~csv_callback.solver.ANSWER_PRIOR_MASS` of the mass spread over the
            answer tokens, the rest over the others) and ``"screened"`` (the same share over the tokens whose loss
            best explains, over each fold's training checkpoints, what loss averaging leaves unexplained, or
            whose loss falls most with the score's rank: a few sizes, each its own candidate). Default for a
            token vector: ``"uniform"`` and ``"answer"`` when the answer mask marks some but not all tokens,
            ``"uniform"`` and ``"screened"`` without an answer mask, else ``"uniform"``; for a domain vector
            ``"uniform"``. A screened candidate, or an exact baseline (loss averaging whenever ``"uniform"`` is a
            prior, the answer tokens' loss whenever ``"answer"`` is), replaces the fixed priors' choice only when it
            is better by more than a standard error over the folds.
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
        domains: ``[n]`` the names of the validation domains, in the order of ``losses``' columns: fits a domain
            vector (no probe, no answer mask), whose report adds the baseline ``"domain"``: the best single domain,
            chosen in each fold as the one whose link fits that fold's training checkpoints best (and
            ``best_domain``, the one chosen on all checkpoints).

    Returns:
        A :class:`SalienceVector`, with the score range it was fitted for, whose ``fit_report`` holds
        ``cv_mse`` and ``cv_mae`` for ``"csv"``,
        ``"uniform"`` (mean loss + link: loss averaging) and, with an answer mask, ``"label"`` (answer-token
        loss + link), all under the same folds, plus the chosen ``prior`` and ``lam`` (``inf`` when an exact
        baseline was chosen: ``prior`` "uniform", loss averaging, or "label", the answer tokens' loss, whose weights
        are then even over the answer tokens), the CV MSE along each fixed prior's path (``cv_mse_path``), each
        screen's (``cv_mse_screened``, keyed ``"<statistic>:<tokens>"``, with the chosen one as ``screened``) and
        the exact baselines' (``cv_mse_exact``), and the held-out predictions, and
        (``interval``) csv's sorted absolute held-out residuals, from which
        :meth:`SalienceVector.predict_interval` makes split-conformal intervals. The csv error is honest about
        those choices: fold f's predictions use the prior and
        ``lam`` that did best on the other folds. Per checkpoint it also holds the score (``scores``), fold
        (``folds``), group label (``groups``, as str; None without groups) and the vector's weighted loss
        (``weighted_loss``): what a report needs to redraw the fit.
    """
    X, y, rng, labels, fold_of, answer, priors = _validate_fit_inputs(losses, scores, groups, probe, answer_mask,
                                                                      task, metric, n_folds, seed, priors, score_range,
                                                                      domains is None)
    anchor = _validate_anchor(anchor, rng)
    if domains is not None:
        if probe is not None or answer_mask is not None:
            raise ValueError("a domain vector (domains=...) weighs validation domains, not a probe's tokens: pass "
                             "neither probe nor answer_mask with it.")
        domains = check_domain_names(domains, X.shape[1])
    # One BLAS thread per call throughout: the solver splits its products over threads of its own, and
    # OpenBLAS's two threads, spinning while Python works between calls, were slower everywhere and up to
    # 10x slower on a busy machine (the Gram product at 500 x 1M: 17-21 s vs 2.7 s; BENCHMARKS.md).
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit(X, y, rng, labels, fold_of, answer, priors, probe, task, metric, anchor, domains)


def _fit(
    X: np.ndarray, y: np.ndarray, rng: tuple[float, float], labels: np.ndarray | None, fold_of: np.ndarray,
    answer: np.ndarray | None, prior_names: Sequence[str], probe: ProbeSet | None, task: str, metric: str,
    anchor: tuple[float, float] | None, domains: tuple[str, ...] | None = None,
) -> SalienceVector:
    m, n = X.shape
    lams = list(_LAMBDA_GRID)
    n_f = int(fold_of.max()) + 1
    centred = centre(X, answer)
    baselines = {"uniform": centred.mean}
    if answer is not None:
        baselines["label"] = centred.answer_mean

    cv_pred: dict[str, np.ndarray] = {}
    for name, L in baselines.items():
        cv_pred[name] = np.empty(m)
        for f in range(n_f):
            tr = fold_of != f
            cv_pred[name][~tr] = _fit_link(L[tr], y[tr], rng, anchor)(L[~tr])
    if domains is not None:
        cv_pred["domain"] = np.empty(m)
        for f in range(n_f):
            tr = fold_of != f
            column, link = _best_column(X[tr], y[tr], rng, anchor)
            cv_pred["domain"][~tr] = link(X[~tr, column])

    # The candidates cross-validation chooses among. Paths: per family, one path per fold plus the final fit's
    # (all rows), all solved together; the final fit at the chosen lam is that path's state there, exactly what
    # a path truncated at that lam would end on. A fixed prior is the same on every training set; a screened
    # prior is made from each training set's own rows (_screened_priors), so no fold's choice sees its held-out
    # scores.
    trains = [fold_of != f for f in range(n_f)] + [np.ones(m, bool)]
    families: list[tuple[str, list[Prior]]] = [
        (name, [Prior.named(name, answer, n)] * len(trains)) for name in prior_names if name != "screened"]
    if "screened" in prior_names:
        families += _screened_priors(X, y, trains, centred.mean, rng, anchor)
    # Every family's paths are solved together: one pass over X per round serves them all (a round costs a fixed
    # part plus a little per path, BENCHMARKS.md section core), where a solve per family paid the fixed part per
    # family. Their working arrays (solve_paths: float64 [paths, n]) stay small beside X once m is in the
    # hundreds.
    paths = _fit_paths(X, centred, y, [(tr, pr) for _, fam in families for tr, pr in zip(trains, fam)], lams, rng,
                       anchor)
    # The exact candidates: loss averaging, the uniform prior's lam -> inf limit, which the path only approaches
    # (its grid stops at lam = 1), and, with the "answer" prior, the answer tokens' loss, the limit of an answer
    # prior with all its mass on them, which no path reaches: so that csv is chosen from a set that contains the
    # baselines it nests (token vectors only: a domain vector's numbers are its paths').
    exact = [] if domains is not None else [
        base for base, prior in (("uniform", "uniform"), ("label", "answer")) if prior in prior_names]
    # pred[c, j]: prediction for checkpoint j from its fold's fit with candidate c: family k at lams[i] is row
    # k * len(lams) + i, then the exact candidates. The fixed priors' rows come first: the choice they make
    # stands unless a later row is clearly better (_choose).
    n_paths = len(families) * len(lams)
    n_kept = sum(not name.startswith("screened") for name, _ in families) * len(lams) or n_paths
    pred = np.empty((n_paths + len(exact), m))
    for k in range(len(families)):
        for f in range(n_f):
            held = fold_of == f
            for i, state in enumerate(paths[k * len(trains) + f]):
                pred[k * len(lams) + i, held] = state.link(state.loss[held])
    for c, base in enumerate(exact):
        pred[n_paths + c] = cv_pred[base]
    fold_mse = np.stack([((pred[:, fold_of == f] - y[fold_of == f]) ** 2).mean(axis=1) for f in range(n_f)], 1)
    cv_pred["csv"] = np.empty(m)
    for f in range(n_f):
        cv_pred["csv"][fold_of == f] = pred[_choose(np.delete(fold_mse, f, axis=1), n_kept), fold_of == f]
    best_c = _choose(fold_mse, n_kept)
    cv_candidates = fold_mse.mean(axis=1)
    if best_c < n_paths:
        best_k, best = divmod(best_c, len(lams))
        family, prior = families[best_k][0], families[best_k][1][-1]
        prior_name = family.split(":")[0]
        final = paths[best_k * len(trains) + n_f][best]
        weights, link, lam = np.exp(log_softmax(matvec(final.coef, X) + prior.log_p(answer, n))), final.link, lams[best]
    else:
        prior_name = exact[best_c - n_paths]
        weights = np.full(n, 1.0 / n) if prior_name == "uniform" else answer / answer.sum()
        link, lam, family = _fit_link(baselines[prior_name], y, rng, anchor), math.inf, prior_name

    wl = matvec(weights, X.T)
    cv_path = cv_candidates[:n_paths].reshape(len(families), len(lams))
    report = {
        "prior": prior_name,
        "anchor": None if anchor is None else list(anchor),
        "lam": lam,
        "lam_path": lams,
        "cv_mse_path": {name: row.tolist() for (name, _), row in zip(families, cv_path)
                        if not name.startswith("screened")},
        **({} if "screened" not in prior_names else {
            "cv_mse_screened": {name.split(":", 1)[1]: row.tolist()
                                for (name, _), row in zip(families, cv_path) if name.startswith("screened")},
            # the chosen screen, "<statistic>:<tokens>", or None
            "screened": family.split(":", 1)[1] if family.startswith("screened") else None}),
        **({} if not exact else {"cv_mse_exact": dict(zip(exact, cv_candidates[n_paths:].tolist()))}),
        "cv_mse": {k: float(np.mean((p - y) ** 2)) for k, p in cv_pred.items()},
        "cv_mae": {k: float(np.mean(np.abs(p - y))) for k, p in cv_pred.items()},
        "cv_pred": {k: p.tolist() for k, p in cv_pred.items()},
        "scores": y.tolist(),
        "folds": fold_of.tolist(),
        "groups": None if labels is None else labels.tolist(),
        "cv": "random" if labels is None else "groups",
        "train_mse": float(np.mean((link(wl) - y) ** 2)),
        "effective_tokens": float(np.exp(-np.sum(weights * np.log(np.maximum(weights, 1e-300))))),
        "n_checkpoints": m,
        **({} if domains is None else {"best_domain": domains[_best_column(X, y, rng, anchor)[0]]}),
        # What SalienceVector.interval needs: csv's honest held-out errors, pooled over checkpoints. The checkpoints
        # of one group are correlated, so the split-conformal rank guarantees coverage only as far as they are
        # exchangeable; a group-level correction (one unit per group) would make the 80% interval infinite with
        # fewer than 4 groups. Computed after the fit: nothing above depends on it.
        INTERVAL_KEY: {"method": INTERVAL_METHOD, "abs_residuals": np.sort(np.abs(cv_pred["csv"] - y)).tolist()},
    }
    sv = SalienceVector(
        weights=weights,
        link=link,
        task=task,
        metric=metric,
        probe_fingerprint=probe.fingerprint if probe is not None else "",
        tokenizer_hash=probe.tokenizer_hash if probe is not None else "",
        fit_report=report,
        score_range=rng,
        domains=domains,
    )
    # The range comes from the vector's own float64 weighted_loss, as the callbacks compute it (a row at a time),
    # not from the solver's float32 products, which put the fitting set's own extremes about 1e-7 outside it.
    seen = [sv.weighted_loss(row) for row in X]  # one float64 row at a time: no float64 copy of X
    report["weighted_loss"] = seen
    return replace(sv, loss_range=(min(seen), max(seen)))


def _choose(fold_mse: np.ndarray, n_kept: int) -> int:
    """The candidate (row of ``fold_mse`` ``[candidates, folds]``, each fold's held-out MSE) chosen: the first
    ``n_kept`` rows are the fixed priors' (prior, lam) points, chosen as they always were, by the least mean
    MSE over the folds; a later row (a screened prior's point, an exact baseline) replaces that choice only when
    its mean MSE is lower by more than one standard error of their paired per-fold differences, and then the
    lowest such row is chosen. Where the two are within the folds' spread of each other the choice a fit
    without the new candidates makes is kept, so that adding candidates does not add selection noise to what
    was fine (the issue's "never worse than today"); with a single fold there is no spread to judge by."""
    mean = fold_mse.mean(axis=1)
    best = int(np.argmin(mean[:n_kept]))
    if fold_mse.shape[1] < 2 or len(mean) == n_kept:
        return best
    diff = fold_mse[n_kept:] - fold_mse[best]  # [new candidates, folds]
    clear = diff.mean(axis=1) + diff.std(axis=1, ddof=1) / math.sqrt(fold_mse.shape[1]) < 0
    if not clear.any():
        return best
    return n_kept + int(np.argmin(np.where(clear, mean[n_kept:], np.inf)))


def _screened_priors(
    X: np.ndarray, y: np.ndarray, trains: Sequence[np.ndarray], mean: np.ndarray, rng: tuple[float, float],
    anchor: tuple[float, float] | None,
) -> list[tuple[str, list[Prior]]]:
    """Per screen of :data:`_SCREENS` (a statistic, a share of the tokens), a family of screened priors, one per
    training set of ``trains`` (bool ``[m]`` each), each made from that set's rows only: the prior's marked
    tokens are the share whose loss correlates most negatively (Pearson, over the set's checkpoints) with

    - ``"rank"``: the rank of the score, as the perplexity-correlation estimators of Thrush et al. 2024
      (arXiv 2409.05816) rank-correlate domains with scores (ranking y, not X, keeps it one product), or
    - ``"residual"``: what loss averaging leaves unexplained, ``y - link(mean)`` (``mean`` ``[m]``: each
      checkpoint's mean loss; the link fitted to the set's rows as the "uniform" baseline's is): the first
      step of a forward stagewise fit started from loss averaging, the uniform prior's limit.

    Both, since neither finds every skill: on a skill that emerges abruptly (ladder_arith, at chance for 90% of
    the checkpoints) the score's ranks are noise almost everywhere and none of its 57 answer tokens is among the
    300 best by rank, 40 are by residual; on ladder_pattern rank finds 21 of 49, residual 26, yet the rank
    screen transferred better across mixtures (BENCHMARKS.md, section blind). Returns ``(name, priors)`` per
    screen, ``name`` being ``"screened:<statistic>:<tokens>"``.
    """
    if X.shape[1] < 2:  # one token: nothing to single out
        return []
    targets = {"rank": [rankdata(y[tr]) for tr in trains],
               "residual": [y[tr] - _fit_link(mean[tr], y[tr], rng, anchor)(mean[tr]) for tr in trains]}
    stats = sorted({stat for stat, _ in _SCREENS})
    corr = _correlations(X, trains * len(stats), [v for stat in stats for v in targets[stat]])  # float32 [S T, n]
    n, T = X.shape[1], len(trains)
    families = []
    for stat, frac in _SCREENS:
        k = min(n - 1, max(_MIN_SCREENED, round(frac * n)))
        family = []
        for c in corr[stats.index(stat) * T : (stats.index(stat) + 1) * T]:
            mask = np.zeros(n, bool)
            mask[np.argsort(c, kind="stable")[:k]] = True  # ties between tokens break by position
            family.append(Prior.marked("screened", mask, X[:, mask].mean(axis=1, dtype=np.float64)))
        families.append((f"screened:{stat}:{k}", family))
    return families


def _correlations(X: np.ndarray, trains: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> np.ndarray:
    """float32 ``[T, n]``: per training set (bool ``[m]``) and its target (``[rows of the set]``), each token's
    Pearson correlation over the set's rows of its loss (``X`` ``[m, n]``) with the target; 0 for a token whose
    loss, or a target that, is constant there. Three products per column block of ``X`` serve every set: no
    copy of ``X``, and bounded float32 temporaries."""
    m, n = X.shape
    share = np.zeros((len(trains), m), X.dtype)  # each set's mean over its rows
    target = np.zeros((len(trains), m), X.dtype)  # each set's centred, unit-norm target, zero off its rows
    for t, (tr, v) in enumerate(zip(trains, targets)):
        share[t, tr] = 1.0 / tr.sum()
        v = v - v.mean()
        norm = np.linalg.norm(v)
        target[t, tr] = v / norm if norm > 0 else 0.0
    rows = np.array([tr.sum() for tr in trains], float)[:, None]
    out = np.empty((len(trains), n), np.float32)
    block = max(1024, _SCREEN_BLOCK_ELEMENTS // m)
    for a in range(0, n, block):
        Xb = X[:, a : a + block]
        mean = (share @ Xb).astype(np.float64)
        var = np.maximum((share @ (Xb * Xb)).astype(np.float64) - mean**2, 0.0)
        std = np.sqrt(var * rows)  # the norm of each token's centred losses over the set's rows
        cov = (target @ Xb).astype(np.float64)  # the targets are centred: no mean to subtract
        out[:, a : a + block] = np.divide(cov, std, out=np.zeros_like(cov), where=std > 0)
    return out


def _best_column(
    X: np.ndarray, y: np.ndarray, rng: tuple[float, float], anchor: tuple[float, float] | None
) -> tuple[int, SigmoidLink]:
    """The column of ``X`` ``[m, n]`` whose fitted link fits ``y`` ``[m]`` best (least squares), and that link."""
    links = [_fit_link(X[:, c].astype(np.float64), y, rng, anchor) for c in range(X.shape[1])]
    errors = [float(np.mean((link(X[:, c]) - y) ** 2)) for c, link in enumerate(links)]
    best = int(np.argmin(errors))
    return best, links[best]


def _fit_paths(
    X: np.ndarray, centred: Centred, y: np.ndarray, specs: Sequence[tuple[np.ndarray, Prior]], lams: Sequence[float],
    rng: tuple[float, float], anchor: tuple[float, float] | None,
) -> list[list[State]]:
    """The path over ``lams`` of each (training rows bool ``[m]``, prior) in ``specs``
    (:func:`~csv_callback.solver.solve_paths`), each starting from the link fitted to its rows' loss averaged
    under its prior (the weighted loss at ``w = p``)."""
    starts = [_fit_link(prior.mean_loss(centred)[train], y[train], rng, anchor) for train, prior in specs]
    return solve_paths(X, centred, y, [(*spec, start) for spec, start in zip(specs, starts)], lams, rng, anchor)


# ---------------------------------------------------------------------- validation and folds
def _validate_fit_inputs(losses, scores, groups, probe, answer_mask, task, metric, n_folds, seed, priors, score_range,
                         token):
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
    labels = None if groups is None else _group_labels(m, groups)
    return X, y, rng, labels, _folds(m, labels, n_folds, seed), answer, _prior_names(priors, answer, token)


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


def _validate_start(start: Any, metric: str, rng: tuple[float, float]) -> SigmoidLink:
    """``start``, a ``(lo, hi, k, L0)`` tuple, as a valid link inside the bounds of score range ``rng``, which
    least squares requires."""
    lo, hi, k, L0 = as_float_tuple(start, "start", 4, "a (lo, hi, k, L0) tuple of 4 numbers")
    try:
        link = SigmoidLink(lo, hi, k, L0)
    except ValueError as e:
        raise ValueError(f"start={start!r} is not a valid link: {e}") from None
    lower, upper = link_bounds(rng)
    outside = [f"{name}={v:.4g} not in [{a:g}, {b:g}]"
               for name, v, a, b in zip(("hi - lo", "L0", "k", "hi"), link.params, lower, upper) if not a <= v <= b]
    if outside:
        raise ValueError(f"start={start!r} is outside the bounds of metric {metric!r}: {'; '.join(outside)} "
                         f"(score range [{rng[0]:g}, {rng[1]:g}]).")
    return link


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


def _prior_names(priors: Sequence[str] | None, answer: np.ndarray | None, token: bool) -> tuple[str, ...]:
    # With every token an answer, the "answer" prior is the uniform one: fitting it again would only cost time.
    # Screening is the default only where nothing marks the answers: the marks, where given, say what it would
    # guess; and a domain vector's few columns are each a whole validation set, nothing to screen.
    proper_subset = answer is not None and not answer.all()
    if priors is None:
        if proper_subset:
            return ("uniform", "answer")
        return ("uniform", "screened") if token and answer is None else ("uniform",)
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


def _folds(m: int, labels: np.ndarray | None, n_folds: int | None, seed: int) -> np.ndarray:
    """int ``[m]``: the fold of each checkpoint (by its group label, str ``[m]``, or at random without), every
    fold leaving at least ``_MIN_LINK_POINTS`` to fit on."""
    if labels is None:
        k = _fold_count(n_folds, m, "checkpoint")
        fold_of = np.random.default_rng(seed).permutation(np.arange(m) % k)
    else:
        fold_of = _group_folds(labels, n_folds)
    held = np.bincount(fold_of)
    f = int(np.argmax(held))
    if m - held[f] < _MIN_LINK_POINTS:
        held_out = "" if labels is None else f" (group(s) {sorted({str(x) for x in labels[fold_of == f]})})"
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
