"""The downstream task scaling law: a (weighted) loss from model size and data, and the score it implies.

The OLMo ladder (Bhagia et al. 2024, arXiv 2412.04403) predicts a large model's task score in two steps:

1. ``L(N, D) = E + A / N**alpha + B / D**beta`` (the Chinchilla form; ``N`` parameters, ``D`` training tokens),
   fitted to a ladder of small runs;
2. a sigmoid link from ``L`` to the score.

Here ``L`` is any loss one vector reads: a salience vector's weighted loss (the paper's argument: it aligns across
data distributions where the plain loss does not), a domain vector's, or a task's own loss, and step 2 is the
vector's link (:class:`~csv_callback.SalienceVector`). :func:`fit_scaling_law` fits step 1 as the OLMo ladder's
code does: ``A = exp(a)``, ``B = exp(b)``, ``alpha, beta, E >= 0``, the Huber loss (``delta`` 1e-3) of the log
residuals ``log(pred) - log(actual)``, L-BFGS-B from the start ``(a, b, alpha, beta, E) = (3, 6, 0.1, 0.2, 1)``
(plus a few more starts, the best kept: a law fitted to other losses than task bpb need not share its basin).

Uncertainty: the log residuals' spread ``s`` (``m - 5`` degrees of freedom) and the Gauss-Newton covariance of
the free parameters, ``s**2 (J^T J)^+`` (a parameter at its bound is held fixed). A prediction's log loss is
normal with the parameters' variance at the target plus ``s**2``: the interval of a new run, not of the mean.
Points of one run are correlated (checkpoints along a trajectory), so with several per run the spread
understates the error for a new size; fit one point per run (its final loss) where the question is a new run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.stats import t
from threadpoolctl import threadpool_limits

from ._checks import as_float_array
from .salience import SalienceVector, check_level

N_PARAMS = 5
_AI2_START = (3.0, 6.0, 0.1, 0.2, 1.0)  # (a, b, alpha, beta, E) of the OLMo ladder's step 1
_STARTS = (_AI2_START, (5.0, 8.0, 0.3, 0.3, 0.5), (1.0, 3.0, 0.05, 0.1, 1.5), (8.0, 10.0, 0.5, 0.5, 0.0))
# AI2's fit leaves a, b and the exponents unbounded above. With few sizes an exponent is barely determined and the
# optimiser can trade it against the amplitude until exp(a) overflows; real laws have exponents well below 3
# (Chinchilla's ~0.3), and |a|, |b| <= 200 keeps exp() finite for N, D up to 1e30.
_BOUNDS = [(-200.0, 200.0), (-200.0, 200.0), (0.0, 3.0), (0.0, 3.0), (0.0, None)]


@dataclass(frozen=True)
class ScalingLaw:
    """``L(N, D) = E + A / N**alpha + B / D**beta`` with its uncertainty.

    Attributes:
        E, A, alpha, B, beta: the law (all >= 0).
        covariance: ``[5, 5]`` covariance of ``(log A, log B, alpha, beta, E)`` (zero rows/columns for a parameter
            at its bound), as a nested list so the law is plain data (``asdict`` is JSON-ready).
        log_residual_std: the spread of ``log(L)`` around the law on the fitted points.
        n_points: how many points were fitted.
    """

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    covariance: list[list[float]]
    log_residual_std: float
    n_points: int

    def predict(self, params: Any, tokens: Any) -> np.ndarray | float:
        """The law's loss at ``params`` (N) and ``tokens`` (D): floats, or arrays that broadcast."""
        N, D = _check_nd(params, tokens)
        out = self.E + self.A / N**self.alpha + self.B / D**self.beta
        return float(out) if out.ndim == 0 else out

    def interval(self, params: Any, tokens: Any, level: float = 0.8) -> tuple[Any, Any]:
        """``(lo, hi)`` of a new run's loss at (N, D) at ``level``: log-normal with the parameters' variance at the
        point plus the residual spread (Student t with ``n_points - 5`` degrees of freedom; infinite when no
        degree of freedom is left)."""
        level = check_level(level)
        N, D = _check_nd(params, tokens)
        pred = np.asarray(self.predict(N, D))
        grad = _log_gradient(self, N, D)  # [..., 5]
        cov = np.asarray(self.covariance)
        var = np.einsum("...i,ij,...j->...", grad, cov, grad) + self.log_residual_std**2
        dof = self.n_points - N_PARAMS
        q = t.ppf(0.5 + level / 2, dof) if dof > 0 else math.inf
        half = q * np.sqrt(var)
        lo, hi = pred * np.exp(-half), pred * np.exp(half)
        return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScalingLaw:
        law = cls(**d)
        vals = [law.E, law.A, law.alpha, law.B, law.beta, law.log_residual_std]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in vals):
            raise ValueError(f"a scaling law's parameters must be finite numbers >= 0, got {d!r}.")
        if np.asarray(law.covariance, dtype=np.float64).shape != (N_PARAMS, N_PARAMS):
            raise ValueError(f"a scaling law's covariance must be 5 x 5, got {law.covariance!r}.")
        return law

    def __str__(self) -> str:
        return (f"L(N, D) = {self.E:.4g} + {self.A:.4g} / N^{self.alpha:.4g} + {self.B:.4g} / D^{self.beta:.4g}  "
                f"({self.n_points} points, log-residual sd {self.log_residual_std:.3g})")


def fit_scaling_law(params: Any, tokens: Any, losses: Any, delta: float = 1e-3) -> ScalingLaw:
    """Fit :class:`ScalingLaw` to losses ``[m]`` of runs (or checkpoints) with ``params`` ``[m]`` (N) and ``tokens``
    ``[m]`` (D): the OLMo ladder's step 1 (module docstring). Needs ``m >= 5`` points with at least two distinct
    N and two distinct D; all values positive and finite."""
    N = as_float_array(params, "params", 1, fix="pass each point's parameter count")
    D = as_float_array(tokens, "tokens", 1, fix="pass each point's training tokens seen")
    L = as_float_array(losses, "losses", 1, fix="drop points whose loss is not finite")
    if not (len(N) == len(D) == len(L)):
        raise ValueError(f"params, tokens and losses must have one value per point, got {len(N)}, {len(D)} and "
                         f"{len(L)}.")
    if len(L) < N_PARAMS:
        raise ValueError(f"a scaling law has {N_PARAMS} parameters; fit it to at least {N_PARAMS} points, got "
                         f"{len(L)}.")
    if (N <= 0).any() or (D <= 0).any() or (L <= 0).any():
        raise ValueError("params, tokens and losses must be positive (the law is fitted to log losses).")
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise ValueError("the points must span at least two model sizes and two token counts; one size (or one data "
                         "budget) leaves the law's exponent in it undetermined.")
    if not (isinstance(delta, (int, float)) and delta > 0):
        raise ValueError(f"delta (the Huber loss's threshold) must be a positive number, got {delta!r}.")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, alpha, beta, E = p
        ta, tb = np.exp(a - alpha * logN), np.exp(b - beta * logD)
        pred = ta + tb + E
        r = np.log(pred) - logL
        small = np.abs(r) <= delta
        loss = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
        dr = np.where(small, r, delta * np.sign(r)) / pred  # d huber / d pred
        grad = np.array([(dr * ta).sum(), (dr * tb).sum(), -(dr * ta * logN).sum(), -(dr * tb * logD).sum(),
                         dr.sum()])
        return float(loss), grad

    best = None
    # L-BFGS-B's BLAS calls on 5-vectors: OpenBLAS's threads, spinning between them, made a fit 20x slower on a
    # busy machine (fit.py limits them for the same reason). Line searches probe steps where exp overflows; the
    # objective is then inf and the search backs off, so those warnings say nothing about the fit.
    with threadpool_limits(limits=1, user_api="blas"), np.errstate(over="ignore", invalid="ignore"):
        for start in _STARTS:
            res = minimize(objective, np.array(start), jac=True, method="L-BFGS-B", bounds=_BOUNDS,
                           options={"ftol": 0.0, "gtol": 1e-10, "maxiter": 20000})
            if np.isfinite(res.fun) and (best is None or res.fun < best.fun - 1e-15):
                best = res
    a, b, alpha, beta, E = best.x
    law = ScalingLaw(E=float(E), A=float(np.exp(a)), alpha=float(alpha), B=float(np.exp(b)), beta=float(beta),
                     covariance=np.zeros((N_PARAMS, N_PARAMS)).tolist(), log_residual_std=0.0, n_points=len(L))
    resid = np.log(law.predict(N, D)) - logL
    dof = len(L) - N_PARAMS
    s2 = float(resid @ resid / dof) if dof > 0 else 0.0
    J = _log_gradient(law, N, D)
    # A parameter at a bound is held fixed: its column says nothing about the spread of the others.
    free = np.array([lo is None or v > lo + 1e-9 for v, (lo, _) in zip(best.x, _BOUNDS)])
    free &= np.array([hi is None or v < hi - 1e-9 for v, (_, hi) in zip(best.x, _BOUNDS)])
    cov = np.zeros((N_PARAMS, N_PARAMS))
    cov[np.ix_(free, free)] = s2 * np.linalg.pinv(J[:, free].T @ J[:, free])
    return ScalingLaw(law.E, law.A, law.alpha, law.B, law.beta, cov.tolist(), math.sqrt(s2), len(L))


def predict_score(
    law: ScalingLaw, vector: SalienceVector, params: Any, tokens: Any, level: float = 0.8
) -> tuple[float, float, float]:
    """``(pred, lo, hi)``: the score ``vector``'s link gives the law's loss at (N, D), with an interval at ``level``
    that combines the law's (:meth:`ScalingLaw.interval`) and the link's own
    (:meth:`~csv_callback.SalienceVector.interval`) in quadrature; NaN bounds for a vector without residuals,
    as there."""
    if not isinstance(law, ScalingLaw) or not isinstance(vector, SalienceVector):
        raise ValueError(f"predict_score takes a ScalingLaw and a SalienceVector, got {type(law).__name__} and "
                         f"{type(vector).__name__}.")
    return vector.score_interval(float(law.predict(params, tokens)), *law.interval(params, tokens, level), level)


def _check_nd(params: Any, tokens: Any) -> tuple[np.ndarray, np.ndarray]:
    N, D = np.asarray(params, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    if not (np.isfinite(N).all() and np.isfinite(D).all() and (N > 0).all() and (D > 0).all()):
        raise ValueError(f"params (N) and tokens (D) must be positive and finite, got {params!r} and {tokens!r}.")
    return N, D


def _log_gradient(law: ScalingLaw, N: np.ndarray, D: np.ndarray) -> np.ndarray:
    """``[..., 5]``: d log L / d (log A, log B, alpha, beta, E) at (N, D)."""
    ta, tb = law.A / N**law.alpha, law.B / D**law.beta
    pred = ta + tb + law.E
    return np.stack([ta, tb, -ta * np.log(N), -tb * np.log(D), np.ones_like(pred)], axis=-1) / pred[..., None]
