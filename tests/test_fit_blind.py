"""Blind fits (issue 17): screened priors found inside each training set, and loss averaging as an exact candidate."""

import numpy as np
import pytest

from csv_callback import fit_salience
from csv_callback.fit import _choose, _correlations, _screened_priors
from csv_callback.salience import FRACTION
from csv_callback.solver import ANSWER_PRIOR_MASS
from csv_callback.testing import synthetic_ladder


@pytest.fixture(scope="module")
def ladder():
    return synthetic_ladder(n_tokens=2000, n_salient=40, seed=1)


@pytest.fixture(scope="module")
def blind(ladder):
    return fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, task="syn")


def test_correlations_are_pearson_over_each_training_set():
    rng = np.random.default_rng(0)
    X = rng.normal(2.0, 1.0, (12, 300)).astype(np.float32)
    X[:, 7] = 3.0  # a constant token: no correlation, not a division by zero
    trains = [np.arange(12) % 3 != 0, np.ones(12, bool)]
    targets = [rng.uniform(0, 1, int(tr.sum())) for tr in trains]
    got = _correlations(X, trains, targets)
    for t, (tr, v) in enumerate(zip(trains, targets)):
        want = [0.0 if j == 7 else np.corrcoef(X[tr, j].astype(np.float64), v)[0, 1] for j in range(300)]
        np.testing.assert_allclose(got[t], want, atol=2e-5)


def test_a_screened_prior_sees_only_its_training_rows(ladder):
    """Each fold's screened prior comes from its own training checkpoints: the held-out scores cannot move it."""
    X, y = ladder.losses, ladder.scores
    train = ladder.groups != ladder.groups[0]
    shuffled = y.copy()
    shuffled[~train] = np.random.default_rng(0).permutation(y[~train])[::-1]
    mean = X.mean(axis=1, dtype=np.float64)
    for (_, a), (_, b) in zip(_screened_priors(X, y, [train], mean, FRACTION, None),
                              _screened_priors(X, shuffled, [train], mean, FRACTION, None)):
        assert np.array_equal(a[0].mask, b[0].mask)
        assert np.exp(a[0].log_p(None, X.shape[1]))[a[0].mask].sum() == pytest.approx(ANSWER_PRIOR_MASS)


def test_blind_fit_finds_the_unmarked_salient_tokens(ladder, blind):
    rep = blind.fit_report
    assert set(rep["cv_mse_path"]) == {"uniform"} and rep["cv_mse_screened"]
    assert "label" not in rep["cv_mse"]
    assert blind.weights[ladder.salient].sum() > 0.9  # 40 of 2000 tokens
    today = fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, priors=["uniform"])
    assert "cv_mse_screened" not in today.fit_report
    assert rep["cv_mse"]["csv"] <= 1.1 * today.fit_report["cv_mse"]["csv"]


def test_blind_fit_is_bit_reproducible(ladder, blind):
    again = fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, task="syn")
    assert np.array_equal(again.weights, blind.weights)
    assert again.fit_report["cv_pred"] == blind.fit_report["cv_pred"]


def test_the_exact_candidate_is_loss_averaging_under_the_same_folds(blind):
    """The exact candidate's held-out predictions are the uniform baseline's, fold for fold."""
    rep = blind.fit_report
    y, folds, uniform = np.asarray(rep["scores"]), np.asarray(rep["folds"]), np.asarray(rep["cv_pred"]["uniform"])
    per_fold = [np.mean((uniform[folds == f] - y[folds == f]) ** 2) for f in np.unique(folds)]
    assert rep["cv_mse_exact"]["uniform"] == pytest.approx(np.mean(per_fold), rel=1e-12)


def test_an_exact_baseline_replaces_the_best_path_only_when_clearly_better():
    paths = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])  # 2 path points x 4 folds
    clear = np.vstack([paths, [[0.5, 0.6, 0.5, 0.6]]])
    assert _choose(clear, 2) == 2
    tied = np.vstack([paths, [[0.2, 1.9, 0.2, 1.9]]])  # better on average, not beyond the folds' spread
    assert _choose(tied, 2) == 0
    assert _choose(clear[:, :1], 2) == 0  # one fold: no spread to judge by


def test_domain_vectors_get_neither_screening_nor_the_exact_candidate(ladder):
    X = np.stack([ladder.losses[:, ladder.salient].mean(1), ladder.losses.mean(1), ladder.losses[:, :50].mean(1)], 1)
    sv = fit_salience(X, ladder.scores, groups=ladder.groups, domains=["a", "b", "c"])
    assert "cv_mse_screened" not in sv.fit_report and "cv_mse_exact" not in sv.fit_report
    assert set(sv.fit_report["cv_mse_path"]) == {"uniform"}


def test_a_blind_fit_of_a_single_token_has_nothing_to_screen(ladder):
    sv = fit_salience(ladder.losses[:, :1], ladder.scores, groups=ladder.groups)
    assert sv.fit_report["cv_mse_screened"] == {} and sv.weights.tolist() == [1.0]
