"""Domain vectors: weights over named validation domains instead of a probe's tokens (issue 15)."""

import json

import numpy as np
import pytest
from safetensors import safe_open

from csv_callback import ProbeMismatchError, SalienceVector, SigmoidLink, fit_salience
from csv_callback.salience import DOMAIN_FORMAT, FORMAT

DOMAINS = ["c4", "code", "wiki", "books"]


def domain_table(seed: int = 0, per_group: int = 12):
    """Three "corpora" whose models reach a different score at the same mean loss: the score follows the code
    domain's loss alone, and each corpus shifts the other domains' losses by its own amount."""
    rng = np.random.default_rng(seed)
    rows, scores, groups = [], [], []
    for g, shift in enumerate((0.0, 0.6, -0.4)):
        for _ in range(per_group):
            code = rng.uniform(1.0, 3.0)
            others = code + shift + rng.normal(0, 0.05, 3)
            rows.append([others[0], code, others[1], others[2]])
            scores.append(0.25 + 0.7 / (1 + np.exp(3.0 * (code - 2.0))) + rng.normal(0, 0.005))
            groups.append(f"corpus{g}")
    return np.array(rows), np.array(scores), groups


@pytest.fixture(scope="module")
def fitted():
    X, y, groups = domain_table()
    return fit_salience(X, y, groups=groups, domains=DOMAINS, task="syn"), X, y


def test_fit_finds_the_domain_that_matters_and_beats_loss_averaging_on_a_held_out_corpus(fitted):
    sv, X, y = fitted
    assert sv.domains == tuple(DOMAINS) and sv.probe_fingerprint == ""
    assert sv.weights[1] > 0.9
    report = sv.fit_report
    assert set(report["cv_mse"]) == {"csv", "uniform", "domain"} and report["best_domain"] == "code"
    assert report["cv_mse"]["csv"] < 0.1 * report["cv_mse"]["uniform"]
    # The best single domain is chosen on each fold's training rows; here that is "code" in every fold, so its
    # held-out predictions are those of a link fitted to the code losses of the other corpora.
    assert report["cv_mse"]["domain"] < 0.1 * report["cv_mse"]["uniform"]
    assert sv.predict(X[:3]) == pytest.approx(y[:3], abs=0.03)


def test_the_best_single_domain_is_chosen_without_the_held_out_fold():
    # In corpus 2 only, the score follows the wiki domain: a choice made with that corpus's scores would differ.
    X, y, groups = domain_table(seed=1)
    last = np.array(groups) == "corpus2"
    y = y.copy()
    y[last] = 0.25 + 0.7 / (1 + np.exp(3.0 * (X[last, 2] - 2.0)))
    sv = fit_salience(X, y, groups=groups, domains=DOMAINS, task="syn")
    held = np.array(sv.fit_report["cv_pred"]["domain"])[last]
    from csv_callback import fit_link

    train = ~last
    expected = fit_link(X[train, 1].astype(np.float32).astype(np.float64), y[train])(X[last, 1].astype(np.float32))
    assert held == pytest.approx(expected, abs=1e-9)


def test_save_load_round_trip_in_the_domain_format(fitted, tmp_path):
    sv, X, _ = fitted
    sv.save(tmp_path / "d.safetensors")
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == DOMAIN_FORMAT and json.loads(meta["json"])["domains"] == DOMAINS
    back = SalienceVector.load(tmp_path / "d.safetensors")
    assert back.domains == tuple(DOMAINS)
    np.testing.assert_array_equal(back.weights, sv.weights)
    assert back.predict(X[0]) == sv.predict(X[0])


def test_token_vectors_keep_their_format(tmp_path):
    # A version that knows no domains still reads token vectors, and refuses a domain vector by its format.
    token = SalienceVector(np.full(4, 0.25), SigmoidLink(0.25, 0.9, 2.0, 2.0), probe_fingerprint="abc")
    token.save(tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and "domains" not in json.loads(meta["json"])
    assert SalienceVector.load(tmp_path / "t.safetensors").domains is None


def test_losses_of_other_domains_or_order_are_refused(fitted):
    sv, X, _ = fitted
    losses = dict(zip(DOMAINS, X[0]))
    assert sv.domain_losses(losses) == pytest.approx(X[0])
    assert sv.domain_losses(dict(reversed(losses.items()))) == pytest.approx(X[0])  # a mapping: order by name
    sv.check_domains(DOMAINS)
    with pytest.raises(ProbeMismatchError, match="another order"):
        sv.check_domains(DOMAINS[::-1])
    with pytest.raises(ProbeMismatchError, match=r"missing \['books'\], unknown \['news'\]"):
        sv.check_domains([*DOMAINS[:3], "news"])
    with pytest.raises(ProbeMismatchError, match=r"miss \['books'\] and have unknown \[\]"):
        sv.domain_losses(dict.fromkeys(DOMAINS[:3], 1.0))
    with pytest.raises(ProbeMismatchError, match="unknown \\['news'\\]"):
        sv.domain_losses({**losses, "news": 2.0})
    with pytest.raises(ProbeMismatchError, match="4 domains"):
        sv.predict(X[0][:3])
    with pytest.raises(ValueError, match="must be numbers"):
        sv.domain_losses({**losses, "c4": "high"})


def test_a_domain_vector_is_not_a_token_vector_and_vice_versa(fitted, tokenizer):
    from csv_callback import ProbeSet

    sv, _, _ = fitted
    probe = ProbeSet.from_texts(["some text to score"], tokenizer)
    with pytest.raises(ProbeMismatchError, match="is a domain vector"):
        sv.check_probe(probe)
    with pytest.raises(ProbeMismatchError, match="is a domain vector"):
        sv.weighted_loss(np.ones(4), fingerprint=probe.fingerprint)
    token = SalienceVector(np.full(4, 0.25), SigmoidLink(0.25, 0.9, 2.0, 2.0), probe_fingerprint="abc")
    with pytest.raises(ProbeMismatchError, match="not validation domains"):
        token.check_domains(DOMAINS)
    with pytest.raises(ProbeMismatchError, match="not validation domains"):
        token.domain_losses(dict.fromkeys(DOMAINS, 1.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domains": ["a", "b"]}, "4 weights and 2 domains"),
        ({"domains": ["a", "b", "a", "c"]}, r"distinct, but \['a'\]"),
        ({"domains": ["a", "", "b", "c"]}, "non-empty str"),
        ({"domains": "abcd"}, "list of non-empty str"),
        ({"domains": ["a", "b", "c", "d"], "probe_fingerprint": "abc"}, "has no probe"),
    ],
)
def test_bad_domain_vectors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SalienceVector(np.full(4, 0.25), SigmoidLink(0.25, 0.9, 2.0, 2.0), **kwargs)


def test_fit_refuses_an_answer_mask_with_domains_and_misnamed_columns():
    X, y, groups = domain_table()
    with pytest.raises(ValueError, match="4 weights and 3 domains"):
        fit_salience(X, y, groups=groups, domains=DOMAINS[:3])
    with pytest.raises(ValueError, match="neither probe nor answer_mask"):
        fit_salience(X, y, groups=groups, domains=DOMAINS, answer_mask=np.array([True, False, False, False]))


def test_corrupt_domain_names_in_a_file_are_refused(fitted, tmp_path):
    import torch

    from csv_callback.files import atomic_save

    sv, _, _ = fitted
    sv.save(tmp_path / "d.safetensors")
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["json"])
    meta["domains"] = ["c4", "c4", "wiki", "books"]
    atomic_save({"weights": torch.from_numpy(sv.weights)}, {"format": DOMAIN_FORMAT, "json": json.dumps(meta)},
                tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad\.safetensors.*distinct"):
        SalienceVector.load(tmp_path / "bad.safetensors")
