import math

import numpy as np
import pytest
import torch

from csv_callback import ProbeMismatchError, ProbeSet, SalienceVector, SigmoidLink


def make_vector(n=5, fingerprint="abc123") -> SalienceVector:
    w = np.arange(1, n + 1, dtype=np.float64)
    return SalienceVector(
        weights=w / w.sum(),
        link=SigmoidLink(lo=0.25, hi=0.9, k=3.0, L0=2.5),
        task="arc_easy",
        metric="acc",
        probe_fingerprint=fingerprint,
        tokenizer_hash="tok",
        loss_range=(1.5, 3.5),
        fit_report={"cv_mse": {"csv": 1e-3, "uniform": 4e-3}},
    )


def test_predict_single_and_batch():
    sv = make_vector()
    losses = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    wl = sv.weighted_loss(losses)
    assert wl == pytest.approx([(1 + 4 + 9 + 16 + 25) / 15, 2.0])
    expected = 0.25 + 0.65 / (1 + np.exp(3.0 * (wl - 2.5)))
    assert sv.predict(losses) == pytest.approx(expected)
    assert sv.predict(torch.tensor(losses[1], dtype=torch.float32)) == pytest.approx(expected[1])
    assert isinstance(sv.predict(losses[0]), float)
    assert sv.extrapolates(wl).tolist() == [True, False]


def test_link_is_monotone_decreasing_between_asymptotes():
    link = SigmoidLink(lo=0.2, hi=0.8, k=2.0, L0=3.0)
    s = link(np.linspace(-10, 20, 101))
    assert np.all(np.diff(s) < 0) and s.max() <= 0.8 and s.min() >= 0.2
    assert link(3.0) == pytest.approx(0.5)


def test_save_load_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.random(1000)
    sv = make_vector()
    sv = SalienceVector(weights=w / w.sum(), link=sv.link, task="t", metric="acc", probe_fingerprint="f",
                        tokenizer_hash="h", loss_range=(0.1, 7.25), fit_report={"lam": 0.01, "cv_pred": {"csv": [0.5]}})
    sv.save(tmp_path / "v.safetensors")
    back = SalienceVector.load(tmp_path / "v.safetensors")
    assert back.weights.dtype == np.float64 and np.array_equal(back.weights, sv.weights)
    assert back.link == sv.link
    for name in ("task", "metric", "probe_fingerprint", "tokenizer_hash", "loss_range", "fit_report"):
        assert getattr(back, name) == getattr(sv, name)


def test_mismatched_probe_is_rejected(tokenizer):
    probe = ProbeSet.from_texts(["one two three four five six"], tokenizer, 64)
    sv = make_vector(n=probe.n_tokens, fingerprint="not-this-probe")
    with pytest.raises(ProbeMismatchError, match="use the probe file shipped with the vector"):
        sv.check_probe(probe)
    with pytest.raises(ProbeMismatchError, match="different probe"):
        sv.predict(np.ones(probe.n_tokens + 1))
    with pytest.raises(ProbeMismatchError, match="compute the losses on the vector's own probe"):
        sv.predict(np.ones(probe.n_tokens), fingerprint=probe.fingerprint)
    SalienceVector(**{**make_vector(n=probe.n_tokens).__dict__, "probe_fingerprint": probe.fingerprint}).check_probe(probe)


@pytest.mark.parametrize(
    "losses, match",
    [
        (np.array([1.0, math.nan, 1.0, 1.0, 1.0]), "non-finite"),
        (np.array([1.0, math.inf, 1.0, 1.0, 1.0]), "non-finite"),
        (np.ones((2, 2, 5)), "dimension"),
        (np.ones((0, 5)), "empty"),
    ],
)
def test_bad_losses(losses, match):
    with pytest.raises(ValueError, match=match):
        make_vector().predict(losses)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": np.array([0.5, 0.6])}, "sum to 1"),
        ({"weights": np.array([1.5, -0.5])}, "non-negative"),
        ({"weights": np.array([0.5, math.nan])}, "non-finite"),
        ({"link": "k0"}, "k > 0"),
        ({"link": "hi<lo"}, "hi >= lo"),
    ],
)
def test_bad_vectors(kwargs, match):
    links = {"k0": lambda: SigmoidLink(0.2, 0.8, 0.0, 1.0), "hi<lo": lambda: SigmoidLink(0.8, 0.2, 1.0, 1.0)}
    with pytest.raises(ValueError, match=match):
        if "link" in kwargs:
            links[kwargs["link"]]()
        else:
            SalienceVector(weights=kwargs["weights"], link=SigmoidLink(0.2, 0.8, 1.0, 1.0))


def test_corrupt_files(tmp_path, tokenizer):
    make_vector().save(tmp_path / "v.safetensors")
    data = (tmp_path / "v.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-7])
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        SalienceVector.load(tmp_path / "cut.safetensors")
    ProbeSet.from_texts(["a probe, not a vector"], tokenizer, 64).save(tmp_path / "probe.safetensors")
    with pytest.raises(ValueError, match="not a 'csv_callback.salience/1' file"):
        SalienceVector.load(tmp_path / "probe.safetensors")
    with pytest.raises(ValueError, match="not a 'csv_callback.probe/1' file"):
        ProbeSet.load(tmp_path / "v.safetensors")
