"""The joint solver of :func:`~csv_callback.fit.fit_salience`: regularisation paths of (token weights, link).

A path minimises, on the checkpoints (rows) it trains on and for each strength ``lam`` of a decreasing grid,

    mean_j (link(x_j . w) - y_j)^2 / var(y)  +  lam * KL(w || p),   w in the simplex,

warm-starting each strength from the previous one, with a fixed budget of L-BFGS-B steps per strength. A fit
needs many such paths over the same losses ``X`` ``[m, n]``: one per cross-validation fold and prior, plus the
final fit's. :func:`solve_paths` runs them in lock step, one thread per path, so that every round of
objective evaluations reads ``X`` once for all of them (see :class:`_LockStep`); the products run on
``_SHARDS`` threads of the solver's own, so the caller should allow BLAS one thread (``fit_salience`` does).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, minimize

from .salience import SigmoidLink, link_bounds, link_curve

# The "answer" prior's share on the answer tokens: its limit is nearly the label baseline, yet every other
# token keeps some prior mass, so the weights can still move anywhere (a share of 1 would pin them to the
# answer tokens for good: log p = -inf elsewhere).
ANSWER_PRIOR_MASS = 0.9
_STEPS_PER_LAMBDA = 50
_GRAM_BLOCK_ELEMENTS = 2**19  # a 2 MiB float32 temporary per block of the Gram product
# The solver's passes over X: column blocks of 2 MiB of float32, which stay in cache between a block's two
# products (measured at 500 x 1M: CPU per round flat from 1 to 8 MiB blocks, 10% more with 0.5 MiB, where
# numpy's per-call overhead shows), split over this many threads. A constant, not the core count, so that
# a fit's rounding is the same on every machine.
_BLOCK_ELEMENTS = 2**19
_SHARDS = 2


@dataclass(frozen=True)
class Prior:
    """A prior over the tokens with two levels: ``log p`` is ``log_answer`` on its marked tokens and
    ``log_other`` elsewhere (both the same for the uniform prior), so no float ``[n]`` array is kept per path.

    The marked tokens are the probe's answer tokens (``mask`` None), or the prior's own ``mask`` (bool ``[n]``,
    with ``mask_mean`` float64 ``[m]``, each checkpoint's mean loss over it): a screened prior marks the tokens
    that one fold's training checkpoints single out (see :func:`csv_callback.fit.fit_salience`).
    """

    name: str
    log_answer: float
    log_other: float
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    mask_mean: np.ndarray | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def named(name: str, answer: np.ndarray | None, n: int) -> Prior:
        """The prior ``name`` (``"uniform"`` or ``"answer"``: ``ANSWER_PRIOR_MASS`` spread over the answer tokens
        ``answer``, bool ``[n]``, the rest over the others) over ``n`` tokens."""
        n_answer = 0 if answer is None else int(answer.sum())
        if name == "uniform" or n_answer == n:  # every token an answer: the answer prior is the uniform one
            return Prior(name, -math.log(n), -math.log(n))
        return Prior(name, *_two_levels(n_answer, n))

    @staticmethod
    def marked(name: str, mask: np.ndarray, mask_mean: np.ndarray) -> Prior:
        """``ANSWER_PRIOR_MASS`` spread over the tokens of ``mask`` (bool ``[n]``, some but not all), the rest over
        the others; ``mask_mean`` float64 ``[m]`` is each checkpoint's mean loss over the marked tokens."""
        return Prior(name, *_two_levels(int(mask.sum()), len(mask)), mask=mask, mask_mean=mask_mean)

    def marks(self, answer: np.ndarray | None) -> np.ndarray | None:
        """bool ``[n]``: the tokens at ``log_answer`` (its own mask, else the answer tokens ``answer``)."""
        return self.mask if self.mask is not None else answer

    def log_p(self, answer: np.ndarray | None, n: int) -> np.ndarray:
        """float64 ``[n]``: ``log p`` of every token (``answer``: the probe's answer tokens, or None)."""
        marks = self.marks(answer)
        if marks is None or self.log_answer == self.log_other:
            return np.full(n, self.log_other)
        return np.where(marks, self.log_answer, self.log_other)

    def mean_loss(self, centred: Centred) -> np.ndarray:
        """float64 ``[m]``: each checkpoint's loss averaged under this prior (the weighted loss at ``w = p``)."""
        marked_mean = self.mask_mean if self.mask is not None else centred.answer_mean
        marks = self.marks(centred.answer)
        if marks is None or self.log_answer == self.log_other:
            return centred.mean
        # The other tokens' mean follows from the overall and the marked tokens' means: no pass over X.
        n, n_marked = len(marks), int(marks.sum())
        other_mean = (n * centred.mean - n_marked * marked_mean) / (n - n_marked)
        return ANSWER_PRIOR_MASS * marked_mean + (1 - ANSWER_PRIOR_MASS) * other_mean


def _two_levels(n_marked: int, n: int) -> tuple[float, float]:
    """``(log_answer, log_other)``: ``ANSWER_PRIOR_MASS`` over ``n_marked`` of ``n`` tokens, the rest elsewhere."""
    return math.log(ANSWER_PRIOR_MASS / n_marked), math.log((1 - ANSWER_PRIOR_MASS) / (n - n_marked))


@dataclass
class State:
    """A path's solution at one lam: ``w = softmax(coef @ X)``, the link, and ``X @ w`` for every row."""

    coef: np.ndarray  # float64 [m], zero on rows the path does not train on
    link: SigmoidLink
    loss: np.ndarray  # float64 [m]: every checkpoint's weighted loss, held-out rows included


@dataclass
class Centred:
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


def centre(X: np.ndarray, answer: np.ndarray | None) -> Centred:
    """The :class:`Centred` summary of the losses ``X`` ``[m, n]`` (float32, read in column blocks, not copied) and
    the answer tokens ``answer`` (bool ``[n]``, or None)."""
    m, n = X.shape
    mean = X.mean(axis=1, dtype=np.float64)
    answer_mean = None if answer is None else X[:, answer].mean(axis=1, dtype=np.float64)
    mu = mean[:, None].astype(X.dtype)
    gram = np.zeros((m, m))
    block = max(1024, _GRAM_BLOCK_ELEMENTS // m)  # columns per block: a bounded float32 temporary
    for a in range(0, n, block):
        Xc = X[:, a : a + block] - mu
        gram += Xc @ Xc.T
    return Centred(mean=mean, gram=gram, answer=answer, answer_mean=answer_mean)


class _Path:
    """One regularisation path: solutions for ``lams`` (decreasing) on the rows ``train``, each warm-started
    from the previous.

    The KL-regularised optimum has ``log w = log p - X_train^T alpha + const`` for some ``alpha``
    (stationarity; ``p`` is the path's prior), so the weights are searched in that m-dimensional family, in
    an orthonormal basis ``B @ Xc_train`` of the row space of the row-centred training losses (whitening
    makes L-BFGS converge in tens, not thousands, of steps). Each strength gets a fixed budget of L-BFGS
    steps: at the weakest strengths the objective is nearly flat and running to convergence only overfits, so
    the budget is part of the regularisation.

    No product needs ``Xc_train``: with the basis coefficients scattered into an m-vector that is zero on
    held-out rows, ``a @ Xc_train`` is ``a @ X`` minus a constant (which the softmax ignores), and the
    gradient's ``Xc_train @ g`` is ``(X @ g)[train]`` because ``g`` sums to zero. So every path reads the
    same matrix and :class:`_LockStep` can serve all of them with one pass.
    """

    def __init__(self, centred: Centred, y: np.ndarray, train: np.ndarray, prior: Prior, start: SigmoidLink, n: int,
                 rng: tuple[float, float], anchor: tuple[float, float] | None) -> None:
        self.train, self.y, self.prior, self.anchor = train, y[train], prior, anchor
        self.y_fit = self.y if anchor is None else np.append(self.y, anchor[1])  # the scores the link fits
        self.B = _whitening(centred.gram[np.ix_(train, train)], n)  # [r, m_train]
        self.r = self.B.shape[0]
        # Dividing the MSE by the score variance makes the objective O(1), so lam is relative and L-BFGS's
        # tolerances are scale-free.
        self.row_w = 1.0 / len(self.y) / max(float(np.var(self.y)), 1e-12)
        lower, upper = link_bounds(rng)
        self.bounds = Bounds(np.concatenate([np.full(self.r, -np.inf), lower]),
                             np.concatenate([np.full(self.r, np.inf), upper]))
        self.x0 = np.concatenate([np.zeros(self.r), np.clip(start.params, lower, upper)])
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
        s, ds_dL, ds_dp = link_curve(x[self.r :], L_fit, grad=True)
        res = s - self.y_fit
        dL = np.zeros(len(self.train))
        dL[self.train] = (2 * self.row_w * res * ds_dL)[: len(self.y)]
        return self.row_w * float(res @ res), dL, (2 * self.row_w * res) @ ds_dp

    def run(
        self, lams: Sequence[float], evaluate: Callable[[np.ndarray, float], tuple[float, np.ndarray, np.ndarray]]
    ) -> list[State]:
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
            states.append(State(coef=self.coef(x), link=SigmoidLink.from_params(x[self.r :]), loss=self.last[1]))
        return states


def solve_paths(
    X: np.ndarray, centred: Centred, y: np.ndarray, specs: Sequence[tuple[np.ndarray, Prior, SigmoidLink]],
    lams: Sequence[float], rng: tuple[float, float], anchor: tuple[float, float] | None,
) -> list[list[State]]:
    """The path over ``lams`` (decreasing) of each spec, all solved in lock step (one thread per path).

    Args:
        X: float32 ``[m, n]``, the losses; read in place, never copied.
        centred: :func:`centre` of ``X`` (and the answer mask the priors use).
        y: float64 ``[m]``, the scores.
        specs: per path, the rows it trains on (bool ``[m]``), the prior of its weights, and the link it starts
            from (at ``w = p``, within the bounds of ``rng``).
        rng: the score range, which bounds every link (:func:`~csv_callback.salience.link_bounds`).
        anchor: ``(loss, score)``, one more point every link fits, or None.

    Returns:
        Per spec, its :class:`State` at each of ``lams``.
    """
    paths = [_Path(centred, y, tr, prior, start, X.shape[1], rng, anchor) for tr, prior, start in specs]
    # The products are split over _SHARDS column ranges in threads of our own (each one BLAS thread, see
    # fit_salience): on these skinny products that beat OpenBLAS's own two threads.
    with ThreadPoolExecutor(_SHARDS) as pool:
        step = _LockStep(X, centred.answer, paths, pool)
        results: list[list[State]] = [[] for _ in paths]

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

    def __init__(
        self, X: np.ndarray, answer: np.ndarray | None, paths: Sequence[_Path], pool: ThreadPoolExecutor
    ) -> None:
        self.X, self.paths, self.pool = X, paths, pool
        self.log_other = np.array([path.prior.log_other for path in paths])
        # log p - log_other is delta on a path's marked tokens, 0 elsewhere: added where a path's row of `marks`
        # is set, for all paths in one call, and not at all when every prior is uniform. One bool [P, n], not a
        # float [P, n] of log p: paths differ in their marks (screened priors) but each has two levels.
        delta = np.array([path.prior.log_answer for path in paths]) - self.log_other
        self.delta, self.marks = None, None
        if delta.any():
            self.delta, self.marks = delta, np.zeros((len(paths), X.shape[1]), bool)
            for p, path in enumerate(paths):
                if delta[p]:
                    self.marks[p] = path.prior.marks(answer)
        m, n = X.shape
        self.block = max(256, _BLOCK_ELEMENTS // m)
        edges = np.linspace(0, -(-n // self.block), _SHARDS + 1).round().astype(int) * self.block
        self.shards = [(int(a), int(min(b, n))) for a, b in itertools.pairwise(edges) if a < n]
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
        m, _n = self.X.shape
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
            # Each block's float64 temporaries are computed in place in scratch buffers: the same arithmetic (the
            # same bits) as fresh arrays, with 3% less of the fit's CPU time at 22 paths (BENCHMARKS.md).
            scratch = np.empty(P * self.block)
            for a, Xb in self._blocks(lo, hi):
                w = Xb.shape[1]
                zb = self.z[:, a : a + w]
                zb[:] = (At @ Xb)[:P]
                if self.delta is not None:
                    self._apply_prior_excess(np.add, zb, a)
                new_top = np.maximum(top, zb.max(axis=1))
                rescale = np.exp(top - new_top)
                eb = np.subtract(zb, new_top[:, None], out=scratch[: P * w].reshape(P, w))
                np.exp(eb, out=eb)
                total = total * rescale + eb.sum(axis=1)
                e[:P, :w] = eb
                acc = acc * rescale + (Xb @ e[:, :w].T)[:, :P]
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
            scratch = np.empty((3, P * self.block))
            log_w_offset = (lse + self.log_other)[:, None]
            for a, Xb in self._blocks(lo, hi):
                w = Xb.shape[1]
                zb = self.z[:, a : a + w]
                wb, log_ratio, wvb = (buf[: P * w].reshape(P, w) for buf in scratch)
                np.exp(np.subtract(zb, lse[:, None], out=wb), out=wb)
                np.subtract(zb, log_w_offset, out=log_ratio)  # log w - log p ...
                if self.delta is not None:
                    self._apply_prior_excess(np.subtract, log_ratio, a)  # ... on the answer tokens too
                np.multiply(lam[:, None], log_ratio, out=wvb)
                np.add((Ct @ Xb)[:P], wvb, out=wvb)
                np.multiply(wb, wvb, out=wvb)  # w * v
                wv += wvb.sum(axis=1)
                kl += np.multiply(wb, log_ratio, out=log_ratio).sum(axis=1)
                e[:P, :w] = wvb
                acc += (Xb @ e[:, :w].T)[:, :P]
            return wv, kl, acc

        parts = list(self.pool.map(lambda s: shard(*s), self.shards))
        return tuple(sum(part[i] for part in parts) for i in range(3))

    def _apply_prior_excess(self, op: np.ufunc, rows: np.ndarray, a: int) -> None:
        """``rows = op(rows, log p - log_other)`` in place for ``rows`` ``[P, w]`` of tokens ``a:a + w``, ``op`` being
        ``np.add`` or ``np.subtract``: each path's ``delta`` on its marked tokens; the others' excess is 0, so they
        are left as they are."""
        op(rows, self.delta[:, None], out=rows, where=self.marks[:, a : a + rows.shape[1]])

    def _blocks(self, lo: int, hi: int):
        for a in range(lo, hi, self.block):
            yield a, self.X[:, a : min(a + self.block, hi)]


def _whitening(gram: np.ndarray, n: int) -> np.ndarray:
    """float64 ``[r, m]`` ``B`` such that the rows of ``B @ Xc`` are orthogonal, span the rows of ``Xc``
    (whose Gram matrix is ``gram``) and have entries O(1)."""
    evals, evecs = np.linalg.eigh(gram)  # [m, m]: cheaper than an SVD of Xc
    keep = evals > evals.max() * 1e-8
    return (evecs[:, keep] / np.sqrt(evals[keep])).T * math.sqrt(n)


def matvec(a: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``a @ M`` for a float64 vector and a float32 matrix, without upcasting the matrix."""
    return (a.astype(M.dtype) @ M).astype(np.float64)
