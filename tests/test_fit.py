import math

import numpy as np
import pytest
import torch
from scipy.special import expit

from csv_callback import ProbeMismatchError, ProbeSet, SalienceVector, SigmoidLink, fit_link, fit_salience
from csv_callback.testing import synthetic_ladder


@pytest.fixture(scope="module")
def ladder():
    return synthetic_ladder(n_tokens=2000, n_salient=40, seed=1)


@pytest.fixture(scope="module")
def fitted(ladder):
    return fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, answer_mask=ladder.salient, task="syn")


def test_recovers_planted_salient_tokens(ladder):
    """Unmarked (no answer mask, one prior): the path's own weights find the 2% of tokens the scores depend on."""
    w = fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, priors=["uniform"]).weights
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    assert w[ladder.salient].sum() > 0.9  # 2% of the tokens carry > 90% of the weight
    top = np.argsort(-w)[: ladder.salient.sum()]
    assert ladder.salient[top].mean() > 0.9


def test_beats_loss_averaging_on_held_out_mixtures(ladder, fitted):
    report = fitted.fit_report
    assert report["cv"] == "groups" and sorted(set(report["folds"])) == [0, 1, 2, 3]
    mse = report["cv_mse"]
    assert set(mse) == {"csv", "uniform", "label"}
    assert mse["csv"] < 0.1 * mse["uniform"]
    assert mse["csv"] < 1e-3
    # the stored held-out predictions are the ones the errors were computed from
    for method, pred in report["cv_pred"].items():
        assert np.mean((np.array(pred) - ladder.scores) ** 2) == pytest.approx(mse[method])
        assert np.mean(np.abs(np.array(pred) - ladder.scores)) == pytest.approx(report["cv_mae"][method])
    lo, hi = fitted.loss_range
    wl = fitted.weighted_loss(ladder.losses)
    assert lo == pytest.approx(wl.min(), rel=1e-5) and hi == pytest.approx(wl.max(), rel=1e-5)


def test_held_out_fold_predictions_are_honest(ladder):
    """A fold's csv predictions come from a fit that never saw that fold's scores."""
    scores = ladder.scores.copy()
    held = ladder.groups == ladder.groups[0]
    a = fit_salience(ladder.losses, scores, groups=ladder.groups)
    scores[held] = np.clip(scores[held] + 0.3, 0, 1)  # change only the held-out fold's scores
    b = fit_salience(ladder.losses, scores, groups=ladder.groups)
    pa, pb = (np.array(v.fit_report["cv_pred"]["uniform"]) for v in (a, b))
    assert np.allclose(pa[held], pb[held])
    # csv may pick another strength for that fold, but its fits were trained without these scores too:
    # the prediction changes only through the choice of strength made on the other folds
    assert np.abs(np.array(b.fit_report["cv_pred"]["csv"])[held] - scores[held]).mean() > 0.1


def test_probe_records_fingerprint_and_label_baseline(tokenizer):
    probe = ProbeSet.concat([
        ProbeSet.from_texts(["General text of the probe, with several tokens in it."], tokenizer, 64),
        ProbeSet.from_pairs([("Two plus two is", " four"), ("The capital of France is", " Paris")], tokenizer, 64),
    ])
    rng = np.random.default_rng(0)
    m = 12
    losses = rng.uniform(1, 4, (m, probe.n_tokens)).astype(np.float32)
    scores = 0.3 + 0.5 / (1 + np.exp(2 * (losses[:, probe.answer_mask.numpy()].mean(1) - 2.5)))
    sv = fit_salience(torch.from_numpy(losses), torch.from_numpy(scores), probe=probe, task="qa")
    assert sv.probe_fingerprint == probe.fingerprint and sv.tokenizer_hash == probe.tokenizer_hash
    assert "label" in sv.fit_report["cv_mse"] and sv.fit_report["cv"] == "random"
    sv.check_probe(probe)


def test_fit_link_recovers_parameters():
    true = SigmoidLink(lo=0.25, hi=0.85, k=4.0, L0=2.0)
    L = np.linspace(0.5, 4.0, 60)
    got = fit_link(L, true(L))
    for name in ("lo", "hi", "k", "L0"):
        assert getattr(got, name) == pytest.approx(getattr(true, name), rel=1e-4)
    anchored = fit_link(L, true(L), anchor=(0.0, 1.0))
    assert anchored.hi <= 1.0 and anchored(0.0) > got(0.0)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda X, y, g: (X[:, :5], y[:2], None), "one score per row"),
        (lambda X, y, g: (X[:2], y[:2], None), "at least 3 checkpoints"),
        (lambda X, y, g: (np.where(np.arange(X.shape[1]) == 3, np.nan, X), y, g), "non-finite"),
        (lambda X, y, g: (X, np.where(np.arange(len(y)) == 0, np.inf, y), g), "non-finite"),
        (lambda X, y, g: (X, y * 100, g), "pass fractions, not percentages"),
        (lambda X, y, g: (X, y, ["one"] * len(y)), "single group"),
        (lambda X, y, g: (X, y, g[:-1]), "one label per checkpoint"),
        (lambda X, y, g: (X[0], y, g), "dimension"),
    ],
)
def test_bad_input(ladder, mutate, match):
    X, y, g = mutate(ladder.losses, ladder.scores, list(ladder.groups))
    with pytest.raises(ValueError, match=match):
        fit_salience(X, y, groups=g)


def test_probe_and_mask_mismatch(ladder, tokenizer):
    probe = ProbeSet.from_texts(["only a few tokens here"], tokenizer, 64)
    with pytest.raises(ProbeMismatchError, match="different probe"):
        fit_salience(ladder.losses, ladder.scores, probe=probe)
    with pytest.raises(ValueError, match="answer_mask must be bool"):
        fit_salience(ladder.losses, ladder.scores, answer_mask=np.ones(7, bool))


def test_fitted_vector_round_trips_and_predicts_the_same(tmp_path, ladder, fitted):
    fitted.save(tmp_path / "syn.safetensors")
    back = SalienceVector.load(tmp_path / "syn.safetensors")
    assert np.array_equal(back.predict(ladder.losses), fitted.predict(ladder.losses))
    assert back.fit_report["cv_mse"] == fitted.fit_report["cv_mse"]
    assert back.fit_report["lam"] == fitted.fit_report["lam"]  # inf too: an exact baseline was chosen


def test_fitting_checkpoints_are_never_flagged_as_extrapolating(ladder, fitted):
    """The fitted range holds every fitting checkpoint's weighted loss, however it is computed: one row at a
    time (the callbacks) or as a matrix (predict). The solver's float32 products had put the two extremes
    about 1e-7 outside it."""
    by_row = np.array([fitted.weighted_loss(row) for row in ladder.losses])
    assert fitted.loss_range == (by_row.min(), by_row.max())
    assert not fitted.extrapolates(by_row).any()
    assert not fitted.extrapolates(fitted.weighted_loss(ladder.losses)).any()
    lo, hi = fitted.loss_range
    assert fitted.extrapolates(lo - 1e-6) and fitted.extrapolates(hi + 1e-6)


def test_fit_is_bit_reproducible(ladder, fitted):
    again = fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, answer_mask=ladder.salient, task="syn")
    assert np.array_equal(again.weights, fitted.weights)
    assert again.fit_report["cv_pred"] == fitted.fit_report["cv_pred"]


def test_a_path_does_not_depend_on_the_paths_solved_with_it(ladder):
    """The folds' paths run in lock step with batched products; a path alone gives the identical result."""
    from csv_callback.fit import _LAMBDA_GRID, _fit_paths
    from csv_callback.salience import FRACTION
    from csv_callback.solver import Prior, centre

    X, y = ladder.losses, ladder.scores
    centred = centre(X, ladder.salient)
    uniform, answer = (Prior.named(name, ladder.salient, X.shape[1]) for name in ("uniform", "answer"))
    train = ladder.groups != ladder.groups[0]
    for prior, other in ((uniform, answer), (answer, uniform)):
        others = [(np.ones(len(y), bool), other), (~train, prior), (train, other)]
        together = _fit_paths(X, centred, y, [(train, prior), *others], _LAMBDA_GRID[:3], FRACTION, None)[0]
        alone = _fit_paths(X, centred, y, [(train, prior)], _LAMBDA_GRID[:3], FRACTION, None)[0]
        for a, b in zip(together, alone):
            assert np.array_equal(a.coef, b.coef) and np.array_equal(a.loss, b.loss) and a.link == b.link


def test_fit_makes_no_copy_of_the_losses():
    """Memory: every product reads the losses in place. The old solver copied the training rows per path
    (1x for the final fit); what remains are bounded block temporaries and each path's float64 [n] working
    arrays, 2 x 15 paths / m of the matrix for a blind fit (its 3 families): with m = 160, about 0.4x."""
    import tracemalloc

    lad = synthetic_ladder(n_tokens=30_000, n_salient=600, checkpoints_per_mixture=40)
    tracemalloc.start()
    try:
        fit_salience(lad.losses, lad.scores, groups=lad.groups)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.75 * lad.losses.nbytes


def test_a_failing_path_stops_the_fit_without_hanging(ladder, monkeypatch):
    """The paths wait for each other every evaluation; one path's error must reach the caller, not deadlock."""
    from csv_callback import solver

    real = solver._Path.link_terms

    def failing(self, x, L):
        if self.train.all():  # only the final fit's path fails; the folds' paths are waiting for it
            raise FloatingPointError("injected")
        return real(self, x, L)

    monkeypatch.setattr(solver._Path, "link_terms", failing)
    with pytest.raises(FloatingPointError, match="injected"):
        fit_salience(ladder.losses, ladder.scores, groups=ladder.groups)


def test_cross_validation_chooses_the_prior(ladder, fitted):
    """With answer tokens marked, the weights may shrink towards them ("answer") or towards all tokens
    ("uniform"); both paths are cross-validated, and so are the exact baselines they nest. Here the answers are
    the planted salient tokens, so the answer-token loss is the oracle (the scores are a function of exactly those
    tokens' mean loss): the answer path beats the uniform one, and the fit lands on the oracle itself, the label
    baseline, which is a candidate (lam = inf, the weights spread evenly over the answer tokens)."""
    rep = fitted.fit_report
    assert set(rep["cv_mse_path"]) == {"uniform", "answer"}
    assert all(len(v) == len(rep["lam_path"]) for v in rep["cv_mse_path"].values())
    assert min(rep["cv_mse_path"]["answer"]) < min(rep["cv_mse_path"]["uniform"])
    assert set(rep["cv_mse_exact"]) == {"uniform", "label"}
    assert rep["cv_mse_exact"]["label"] < min(rep["cv_mse_path"]["answer"])
    # the exact candidate's held-out predictions are the label baseline's, fold for fold
    y, folds, label = np.asarray(rep["scores"]), np.asarray(rep["folds"]), np.asarray(rep["cv_pred"]["label"])
    per_fold = [np.mean((label[folds == f] - y[folds == f]) ** 2) for f in np.unique(folds)]
    assert rep["cv_mse_exact"]["label"] == pytest.approx(np.mean(per_fold), rel=1e-12)
    assert rep["prior"] == "label" and rep["lam"] == math.inf
    assert np.array_equal(fitted.weights, ladder.salient / ladder.salient.sum())
    assert rep["cv_mse"]["csv"] <= 1.25 * rep["cv_mse"]["label"]
    only_uniform = fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, answer_mask=ladder.salient,
                                priors=["uniform"])
    assert set(only_uniform.fit_report["cv_mse_path"]) == {"uniform"} and only_uniform.fit_report["prior"] == "uniform"
    assert set(only_uniform.fit_report["cv_mse_exact"]) == {"uniform"}  # label nests in the answer prior only


def test_answer_prior_is_a_distribution_with_the_answer_share():
    from csv_callback.solver import ANSWER_PRIOR_MASS, Prior, centre

    rng = np.random.default_rng(0)
    X = rng.uniform(1, 4, (6, 50)).astype(np.float32)
    answer = np.zeros(50, bool)
    answer[[3, 17, 18, 40]] = True
    centred = centre(X, answer)
    for name in ("uniform", "answer"):
        prior = Prior.named(name, answer, 50)
        p = np.exp(prior.log_p(answer, 50))
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert p[answer].sum() == pytest.approx(ANSWER_PRIOR_MASS if name == "answer" else 4 / 50, abs=1e-12)
        # the weighted loss where every path starts (w = p), without a pass over X
        np.testing.assert_allclose(prior.mean_loss(centred), X.astype(np.float64) @ p, rtol=1e-6)


def test_default_priors_follow_the_answer_mask(ladder):
    all_answers = np.ones(ladder.losses.shape[1], bool)  # e.g. a probe of pairs only: "answer" would be uniform
    sv = fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, answer_mask=all_answers)
    assert set(sv.fit_report["cv_mse_path"]) == {"uniform"}
    explicit = fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, answer_mask=all_answers,
                            priors=["answer"])
    assert np.array_equal(explicit.weights, sv.weights)  # with every token an answer, it is the uniform prior
    plain = fit_salience(ladder.losses, ladder.scores, groups=ladder.groups)
    assert set(plain.fit_report["cv_mse_path"]) == {"uniform"} and "label" not in plain.fit_report["cv_mse"]


def test_anchor_pins_the_top_of_the_link_when_no_checkpoint_comes_near_it(ladder):
    # A task whose perfect model scores 1, fitted only on checkpoints below 0.6 and asked about those above.
    salient_loss = ladder.losses[:, ladder.salient].mean(1, dtype=np.float64)
    y = 0.25 + 0.75 * expit(-3.0 * (salient_loss - 2.6))
    low = y < 0.6
    # Scores with sampling noise, as lm-eval's are (sd 0.02): noiseless ones of the exact feature (the answer
    # tokens' loss, a candidate) would let a free link find its top from the low end alone.
    noisy = np.clip(y + 0.02 * np.random.default_rng(0).standard_normal(len(y)), 0, 1)
    kw = {"groups": ladder.groups[low], "answer_mask": ladder.salient}
    free = fit_salience(ladder.losses[low], noisy[low], **kw)
    pinned = fit_salience(ladder.losses[low], noisy[low], anchor=(0.0, 1.0), **kw)
    assert free.fit_report["anchor"] is None and pinned.fit_report["anchor"] == [0.0, 1.0]
    assert pinned.link(0.0) == pytest.approx(1.0, abs=1e-3)

    def mse(sv):
        return float(np.mean((sv.predict(ladder.losses[~low]) - y[~low]) ** 2))

    assert mse(pinned) < 1e-3 and mse(pinned) < 0.1 * mse(free)  # measured: 5.2e-5 and 4.8e-2 to 5.9e-2
    # The baselines' links are anchored too, so csv is compared with them on equal terms.
    rep, mean_loss, y_low = pinned.fit_report, ladder.losses[low].mean(1, dtype=np.float64), noisy[low]
    held = np.array(rep["folds"]) == 0
    want = fit_link(mean_loss[~held], y_low[~held], anchor=(0.0, 1.0))(mean_loss[held])
    assert np.allclose(np.array(rep["cv_pred"]["uniform"])[held], want)


@pytest.mark.parametrize("anchor, match", [((0.0, 1.5), "in \\[0, 1\\]"), ((float("nan"), 1.0), "finite"),
                                           ((-1.0, 1.0), "loss >= 0"), ("top", "pair of numbers"),
                                           ((0.0, 1.0, 2.0), "pair of numbers"), ("01", "pair of numbers")])
def test_bad_anchor(ladder, anchor, match):
    with pytest.raises(ValueError, match=match):
        fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, anchor=anchor)
    with pytest.raises(ValueError, match=match):
        fit_link(ladder.losses.mean(1), ladder.scores, anchor=anchor)


@pytest.mark.parametrize("priors, match", [(["answer"], "needs answer tokens"), (["flat"], "priors must be"),
                                           ([], "priors must be"), (["uniform", "uniform"], "priors must be")])
def test_bad_priors(ladder, priors, match):
    with pytest.raises(ValueError, match=match):
        fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, priors=priors)


TWELVE_GROUPS = [f"g{i % 12}" for i in range(48)]  # > 10 groups: n_folds folds of groups


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_folds": -3}, "n_folds must be an int >= 2, got -3"),
        ({"n_folds": 0}, "n_folds must be an int >= 2"),
        ({"n_folds": 1}, "n_folds must be an int >= 2"),
        ({"n_folds": 2.5}, "n_folds must be an int >= 2, got 2.5"),
        ({"n_folds": True}, "n_folds must be an int >= 2"),
        ({"n_folds": 49}, "n_folds=49 is more than the 48 checkpoints to split into folds; pass n_folds <= 48"),
        ({"n_folds": 0, "groups": TWELVE_GROUPS}, "n_folds must be an int >= 2"),
        ({"n_folds": 13, "groups": TWELVE_GROUPS}, "n_folds=13 is more than the 12 groups"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"seed": 0.5}, "seed must be an int >= 0"),
        ({"task": 5}, "task must be a non-empty str"),
        ({"metric": None}, "metric must be a non-empty str"),
        ({"priors": 5}, "priors must be"),
        ({"groups": "mix"}, "groups is a single str 'mix'; pass one label per checkpoint"),
        (
            {"groups": ["big"] * 47 + ["small"]},
            r"holds out 47 of the 48 checkpoints \(group\(s\) \['big'\]\), leaving 1",
        ),
        ({"probe": "probe.safetensors"}, "probe must be a ProbeSet, got str"),
    ],
)
def test_bad_cross_validation_parameters(ladder, kwargs, match):
    """Bad folds, seeds and names fail before the fit, instead of folds from uninitialised memory or a crash."""
    assert len(ladder.scores) == 48
    with pytest.raises(ValueError, match=match):
        fit_salience(ladder.losses, ladder.scores, **kwargs)


def test_default_folds_fit_few_checkpoints_one_per_fold(ladder):
    sv = fit_salience(ladder.losses[:4], ladder.scores[:4])
    assert sorted(sv.fit_report["folds"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="n_folds=5 is more than the 4 checkpoints"):
        fit_salience(ladder.losses[:4], ladder.scores[:4], n_folds=5)


@pytest.mark.parametrize(
    "n, scale, kwargs, match",
    [
        (None, 100, {}, "pass fractions, not percentages"),
        (1, 1, {}, "fit_link needs at least 2 \\(loss, score\\) points besides the anchor, got 1"),
        (1, 1, {"anchor": (0.0, 1.0)}, "at least 2 .* besides the anchor, got 1"),
        (None, 1, {"start": (float("nan"), 0.0, 1.0, 0.0)}, "start=.* is not a valid link: .*finite"),
        (None, 1, {"start": (0.0, 1.0, 1.0)}, "start must be a \\(lo, hi, k, L0\\) tuple of 4 numbers"),
        (None, 1, {"start": (1.0, 0.0, -1.0, 0.0)}, "is not a valid link: .*k > 0"),
        (None, 1, {"start": (0.2, 1.5, 3.0, 2.0)}, "outside the bounds of metric 'acc': .*; hi=1.5 not in \\[0, 1\\]"),
        (None, 1, {"start": (0.2, 0.9, 3.0, -1.0)}, "L0=-1 not in \\[0, inf\\]"),
        (None, 1, {"metric": None}, "metric must be a non-empty str"),
    ],
)
def test_fit_link_bad_input(ladder, n, scale, kwargs, match):
    """fit_link validates like fit_salience (the same helpers, the same messages)."""
    loss, scores = ladder.losses.mean(1)[:n], ladder.scores[:n] * scale
    with pytest.raises(ValueError, match=match):
        fit_link(loss, scores, **kwargs)


def test_fraction_scores_get_the_bounded_link_whatever_the_metric_is_named(ladder, fitted):
    """The same [0, 1] scores named acc_norm got lo=-127, hi=1.47 (predictions 1.07 at zero loss, -4.5 at 10):
    the bounds came from the name "acc". Scores all in [0, 1] are fractions, whatever the metric's name."""
    L = ladder.losses.mean(1, dtype=np.float64)
    acc = fit_link(L, ladder.scores)
    for metric in ("acc_norm", "exact_match"):
        assert fit_link(L, ladder.scores, metric) == acc
    grid = acc(np.linspace(0.0, 10.0, 101))
    assert grid.min() >= 0.0 and grid.max() <= 1.0
    norm = fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, answer_mask=ladder.salient, task="syn",
                        metric="acc_norm")
    assert norm.metric == "acc_norm" and norm.score_range == fitted.score_range == (0.0, 1.0)
    assert np.array_equal(norm.weights, fitted.weights) and norm.link == fitted.link
    assert norm.fit_report["cv_pred"] == fitted.fit_report["cv_pred"]


def test_declared_score_range_bounds_the_link_and_is_recorded(ladder):
    L, y = ladder.losses.mean(1, dtype=np.float64), ladder.scores
    fraction = fit_link(L, y)
    percent = fit_link(L, 100 * y, "acc_norm", score_range=(0, 100))
    for name in ("lo", "hi"):
        assert getattr(percent, name) == pytest.approx(100 * getattr(fraction, name), rel=1e-6)
    for name in ("k", "L0"):
        assert getattr(percent, name) == pytest.approx(getattr(fraction, name), rel=1e-6)
    assert 0 <= percent.hi <= 100 and percent.hi - percent.lo <= 100
    # Undeclared scores outside [0, 1] have no known range: the link is unbounded, and the vector says so.
    assert fit_link(L, 100 * y, "acc_norm").lo < -1000
    few = slice(0, 12)
    sv = fit_salience(ladder.losses[few], 100 * y[few], metric="acc_norm", score_range=(0, 100))
    assert sv.score_range == (0.0, 100.0) and 0 <= sv.link.hi <= 100 and sv.link.hi - sv.link.lo <= 100
    assert fit_salience(ladder.losses[few], 100 * y[few], metric="acc_norm").score_range == (-math.inf, math.inf)
    # A fraction metric that could leave [0, 1] (a score difference, say) opts out of the inference.
    free = fit_link(L, y, "acc_delta", score_range=(-math.inf, math.inf))
    assert free.hi > 1 and free.lo < -100


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"score_range": (0, 0.5)},
            r"score_range=\(0, 0.5\) needs scores in \[0, 0.5\], got range .*score_range=\(lo, hi\)",
        ),
        ({"score_range": (0, math.inf)}, "a half-bounded range bounds no link"),
        ({"score_range": (1, 0)}, r"score_range must be \(lo, hi\) with finite lo < hi"),
        ({"score_range": (math.nan, 1)}, "finite lo < hi"),
        ({"score_range": "01"}, r"score_range must be a \(lo, hi\) pair of numbers"),
        ({"score_range": (0, 2), "anchor": (0.0, 3.0)}, r"the anchor's score must be in \[0, 2\], the score range"),
        ({"metric": "acc_norm", "anchor": (0.0, 1.5)}, r"must be in \[0, 1\], the score range, got 1.5; .*score_range"),
    ],
)
def test_bad_score_range(ladder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_salience(ladder.losses, ladder.scores, groups=ladder.groups, **kwargs)
    with pytest.raises(ValueError, match=match):
        fit_link(ladder.losses.mean(1), ladder.scores, **kwargs)


@pytest.fixture(scope="module")
def text_probe(tokenizer):
    return ProbeSet.from_texts(["The probe of the command line fit, a few words long.", "Another line of it."],
                               tokenizer, 64)


def test_cli_fit_takes_a_score_range(tmp_path, text_probe, capsys):
    """`fit --metric acc_norm --score-range 0 100` on percentages: the vector's link and range are the range's."""
    from csv_callback.cli import main
    from csv_callback.store import LossStore

    lad = synthetic_ladder(n_tokens=text_probe.n_tokens, n_salient=4, checkpoints_per_mixture=4, seed=2)
    store = LossStore(tmp_path / "store", text_probe)
    rows = ["checkpoint,score"]
    for i, (losses, score, group) in enumerate(zip(lad.losses, lad.scores, lad.groups)):
        store.write(f"{group}-{i}", losses, step=i)
        rows.append(f"{group}-{i},{float(100 * score)!r}")
    (tmp_path / "scores.csv").write_text("\n".join(rows) + "\n")
    args = ["fit", str(tmp_path / "store"), "--task", "t", "--metric", "acc_norm", "--scores",
            str(tmp_path / "scores.csv"), "--groups", "re:^([^-]+)-"]
    assert main([*args, "--score-range", "0", "100", "--out", str(tmp_path / "pct.safetensors")]) == 0
    sv = SalienceVector.load(tmp_path / "pct.safetensors")
    assert sv.score_range == (0.0, 100.0) and 0 <= sv.link.hi <= 100 and sv.link.hi - sv.link.lo <= 100
    sv.check_probe(text_probe)
    assert main([*args, "--score-range", "0", "50", "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "needs scores in [0, 50]" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_vector_fitted_without_a_probe_is_refused_by_check_probe(text_probe):
    """fit_salience(probe=None) writes a vector with no fingerprint; it used to pass check_probe against any
    probe of the same length."""
    rng = np.random.default_rng(0)
    losses = rng.uniform(1, 4, (8, text_probe.n_tokens))
    scores = 0.3 + 0.5 / (1 + np.exp(2 * (losses.mean(1) - 2.5)))
    sv = fit_salience(losses, scores)
    assert sv.probe_fingerprint == ""
    with pytest.raises(ProbeMismatchError, match=r"no probe fingerprint .*fit_salience\(\.\.\., probe=probe\)"):
        sv.check_probe(text_probe)
    sv.probe_fingerprint = text_probe.fingerprint  # the documented way out, once the losses are known to match
    sv.check_probe(text_probe)


def test_weighted_loss_of_a_large_table_goes_in_row_chunks(ladder, fitted, monkeypatch):
    """A table larger than one chunk is converted to float64 a chunk of rows at a time (the CLI's predict and fit
    read gigabytes of float32); its values are those of the whole table, and a bad entry is named by chunk."""
    from csv_callback import salience

    whole = fitted.weighted_loss(ladder.losses)
    monkeypatch.setattr(salience, "_CHUNK_BYTES", 5 * 8 * ladder.losses.shape[1])  # 5 rows per chunk
    np.testing.assert_allclose(fitted.weighted_loss(ladder.losses), whole, rtol=1e-13)
    np.testing.assert_allclose(fitted.weighted_loss(torch.from_numpy(ladder.losses)), whole, rtol=1e-13)
    bad = ladder.losses.copy()
    bad[12, 7] = np.nan
    with pytest.raises(ValueError, match=r"losses\[10:15\] contains 1 non-finite value\(s\).* at index \(2, 7\)"):
        fitted.weighted_loss(bad)
    with pytest.raises(ProbeMismatchError, match="different probe"):
        fitted.weighted_loss(ladder.losses[:, :-1])
