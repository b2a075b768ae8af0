"""csv-callback: predict downstream benchmark scores from per-token probe losses while a model trains.

Implements the Capability Salience Vector of Ge et al., ACL 2025 (arXiv:2506.13216).
"""

from .evaluator import Evaluation, SalienceEvaluator, Sharding
from .fit import fit_link, fit_salience
from .forecast import forecast_score, trajectory_prior, with_prior
from .losses import sequence_loglikelihoods, token_losses
from .probe import ProbeMismatchError, ProbeSet, tokenizer_hash
from .salience import SalienceVector, SigmoidLink
from .store import RunMismatchError

__all__ = [
    "Evaluation",
    "ProbeMismatchError",
    "ProbeSet",
    "RunMismatchError",
    "SalienceEvaluator",
    "SalienceVector",
    "Sharding",
    "SigmoidLink",
    "fit_link",
    "fit_salience",
    "forecast_score",
    "sequence_loglikelihoods",
    "token_losses",
    "tokenizer_hash",
    "trajectory_prior",
    "with_prior",
]
__version__ = "0.1.0"
