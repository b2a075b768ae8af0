import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from csv_callback import ProbeMismatchError, ProbeSet, SalienceVector, SigmoidLink
from csv_callback.testing import train_tokenizer


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
    for name in ("task", "metric", "probe_fingerprint", "tokenizer_hash", "loss_range", "fit_report", "score_range"):
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
    SalienceVector(**{**make_vector(n=probe.n_tokens).__dict__, "probe_fingerprint": probe.fingerprint}).check_probe(
        probe
    )


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
        ({"weights": np.array([0.5, math.nan])}, r"non-finite .*; re-fit the vector\.$"),  # advice for weights
        ({"link": "k0"}, "k > 0"),
        ({"link": "hi<lo"}, "hi >= lo"),
        ({"link": "str"}, "must be real numbers"),
        ({"link": "bool"}, "must be real numbers"),
    ],
)
def test_bad_vectors(kwargs, match):
    links = {"k0": lambda: SigmoidLink(0.2, 0.8, 0.0, 1.0), "hi<lo": lambda: SigmoidLink(0.8, 0.2, 1.0, 1.0),
             "str": lambda: SigmoidLink("a", 1.0, 1.0, 1.0), "bool": lambda: SigmoidLink(0.0, True, 1.0, 1.0)}
    if "link" in kwargs:
        build = links[kwargs["link"]]
    else:
        build = lambda: SalienceVector(weights=kwargs["weights"], link=SigmoidLink(0.2, 0.8, 1.0, 1.0))  # noqa: E731
    with pytest.raises(ValueError, match=match):
        build()


def test_corrupt_files(tmp_path, tokenizer):
    make_vector().save(tmp_path / "v.safetensors")
    data = (tmp_path / "v.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-7])
    with pytest.raises(ValueError, match=r"not a readable \.safetensors"):
        SalienceVector.load(tmp_path / "cut.safetensors")
    ProbeSet.from_texts(["a probe, not a vector"], tokenizer, 64).save(tmp_path / "probe.safetensors")
    with pytest.raises(ValueError, match=r"not a 'csv_callback\.salience/2' file"):
        SalienceVector.load(tmp_path / "probe.safetensors")
    with pytest.raises(ValueError, match=r"not a 'csv_callback\.probe/1' file"):
        ProbeSet.load(tmp_path / "v.safetensors")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"link": None}, "link must be a SigmoidLink, got NoneType"),
        ({"link": {"lo": 0.2, "hi": 0.8, "k": 1.0, "L0": 1.0}}, "link must be a SigmoidLink, got dict"),
        ({"loss_range": (math.nan, math.nan)}, r"loss_range must be \(min, max\) with min <= max and no NaN"),
        ({"loss_range": (5.0, 1.0)}, r"min <= max"),
        ({"loss_range": 3.0}, r"loss_range must be a \(min, max\) pair"),
        ({"loss_range": "15"}, r"loss_range must be a \(min, max\) pair"),
        ({"task": 5}, "task must be a non-empty str"),
        ({"metric": ""}, "metric must be a non-empty str"),
        ({"probe_fingerprint": None}, "probe_fingerprint must be a str"),
        ({"fit_report": [1]}, "fit_report must be a dict, got list"),
    ],
)
def test_bad_link_range_and_names(kwargs, match):
    """A vector that could never predict (no link) or never flag extrapolation (NaN range) is refused."""
    with pytest.raises(ValueError, match=match):
        SalienceVector(**{**make_vector().__dict__, **kwargs})


def test_non_finite_weighted_loss_extrapolates():
    sv = make_vector()  # loss_range (1.5, 3.5)
    assert sv.extrapolates(math.nan) is True and sv.extrapolates(math.inf) is True
    assert sv.extrapolates(np.array([math.nan, 2.0, 9.0, -math.inf])).tolist() == [True, False, True, True]
    unbounded = SalienceVector(**{**sv.__dict__, "loss_range": (-math.inf, math.inf)})
    assert unbounded.extrapolates(math.nan) is True and unbounded.extrapolates(1e6) is False


def _variant(tmp_path, name, meta_json=None, raw_json=None, weights=None, drop_json=False):
    """A copy of a valid vector file with its metadata or weights replaced."""
    good = tmp_path / "good.safetensors"
    make_vector().save(good)
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    if drop_json:
        del meta["json"]
    elif raw_json is not None:
        meta["json"] = raw_json
    elif meta_json is not None:
        meta["json"] = json.dumps(meta_json(json.loads(meta["json"])))
    path = tmp_path / name
    save_file({"weights": load_file(str(good))["weights"] if weights is None else weights}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "variant, reason",
    [
        ({"raw_json": '"hello"'}, "its metadata is a JSON str, not an object"),
        ({"raw_json": "[1, 2]"}, "its metadata is a JSON list"),
        ({"raw_json": "{not json"}, "Expecting property name"),
        ({"drop_json": True}, "its metadata has no 'json' entry"),
        ({"meta_json": lambda j: {**j, "color": "red"}}, r"unknown keys \['color'\]"),
        ({"meta_json": lambda j: {k: v for k, v in j.items() if k != "link"}}, r"missing keys \['link'\]"),
        ({"meta_json": lambda j: {**j, "link": None}}, "its link is a JSON NoneType"),
        ({"meta_json": lambda j: {**j, "link": {**j["link"], "k": -1}}}, "k > 0"),
        ({"meta_json": lambda j: {**j, "loss_range": [math.nan, math.nan]}}, "no NaN"),
        ({"meta_json": lambda j: {**j, "task": 5}}, "task must be a non-empty str"),
        ({"weights": torch.full((5,), 0.2).bfloat16()}, "the weights are torch.bfloat16, not torch.float64"),
        ({"weights": torch.full((5,), math.nan, dtype=torch.float64)}, "non-finite"),
    ],
)
def test_malformed_vector_file_names_the_file(tmp_path, variant, reason):
    path = _variant(tmp_path, "bad.safetensors", **variant)
    before = path.read_bytes()
    pattern = (
        f"{re.escape(str(path))} is not a valid csv_callback salience vector file: .*{reason}.*; re-fit or re-save it"
    )
    with pytest.raises(ValueError, match=pattern):
        SalienceVector.load(path)
    assert path.read_bytes() == before  # loading never rewrites


@pytest.fixture(scope="module")
def other_tokenizer(corpus):
    return train_tokenizer(corpus[:5], vocab_size=300)


def test_display_refuses_another_tokenizer(tmp_path, tokenizer, other_tokenizer):
    """The report and the W&B view decode the probe's ids: another tokenizer would show other text."""
    from csv_callback.report import write_report
    from csv_callback.wandb_view import salience_html

    probe = ProbeSet.from_texts(["def f(x): return x + 1", "Lists are mutable sequences."], tokenizer, 64)
    sv = SalienceVector(**{**make_vector(n=probe.n_tokens).__dict__, "probe_fingerprint": probe.fingerprint})
    with pytest.raises(ProbeMismatchError, match="not the one this probe was built with"):
        salience_html(sv, probe, other_tokenizer)
    with pytest.raises(ProbeMismatchError, match="not the one this probe was built with"):
        write_report(sv, tmp_path / "report", probe=probe, tokenizer=other_tokenizer)
    assert not (tmp_path / "report").exists()  # failed before writing anything
    assert "most salient tokens" in salience_html(sv, probe, tokenizer)  # its own tokenizer is fine


@pytest.mark.parametrize(
    "link, score_range, reason",
    [
        ({"lo": -3.0, "hi": 4.0}, None, r"link lo=-3, hi=4 does not fit the score range \[0, 1\]"),
        ({"lo": -0.5, "hi": 0.9}, None, r"hi - lo <= 1"),  # a span wider than the range
        ({"lo": 50.0, "hi": 90.0}, [0, 1], "does not fit the score range"),  # a percentage link on fractions
        ({"lo": -1e308, "hi": 1e308}, None, "finite hi - lo"),
        ({"lo": -1e308, "hi": 1e308}, [-math.inf, math.inf], "finite hi - lo"),  # would predict inf or NaN
        ({"lo": 0.2, "hi": 0.9}, [0, math.inf], "half-bounded"),
        ({"lo": 0.2, "hi": 0.9}, "wide", r"score_range must be a \(lo, hi\) pair"),
    ],
)
def test_link_outside_the_score_range_is_refused_naming_the_file(tmp_path, link, score_range, reason):
    """A crafted "acc" vector with lo=-3, hi=4 predicted -1.6 and 1.5 as accuracies, unflagged."""

    def craft(meta):
        meta = {**meta, "link": {**meta["link"], **link}}
        return meta if score_range is None else {**meta, "score_range": score_range}

    path = _variant(tmp_path, "crafted.safetensors", meta_json=craft)
    pattern = f"{re.escape(str(path))} is not a valid csv_callback salience vector file: .*{reason}.*; re-fit"
    with pytest.raises(ValueError, match=pattern):
        SalienceVector.load(path)


def test_the_score_range_bounds_every_vector_built():
    good = make_vector()
    assert good.score_range == (0.0, 1.0)  # named by metric "acc"
    with pytest.raises(ValueError, match=r"does not fit the score range \[0, 1\].*; re-fit the vector"):
        SalienceVector(**{**good.__dict__, "link": SigmoidLink(-3.0, 4.0, 1.0, 2.0)})
    # An unbounded metric's link may take any (finite) values, and predicts finite scores far from its centre.
    free = SalienceVector(**{**good.__dict__, "metric": "logprob", "score_range": None,
                             "link": SigmoidLink(-1e300, 1e300, 1.0, 2.0)})
    assert free.score_range == (-math.inf, math.inf)
    assert np.isfinite(free.predict(np.array([[0.0] * 5, [100.0] * 5]))).all()
    percent = SalienceVector(**{**good.__dict__, "score_range": (0, 100), "link": SigmoidLink(25.0, 90.0, 3.0, 2.5)})
    assert percent.score_range == (0.0, 100.0)


def _format_1_file(path, metric):
    """A vector file as csv-callback wrote it before the score range was recorded (format 1)."""
    sv = make_vector()
    meta = {"link": {"lo": 0.25, "hi": 0.9, "k": 3.0, "L0": 2.5}, "task": "arc_easy", "metric": metric,
            "probe_fingerprint": "abc123", "tokenizer_hash": "tok", "loss_range": [1.5, 3.5],
            "fit_report": {"cv_mse": {"csv": 1e-3}}}
    save_file({"weights": torch.from_numpy(sv.weights)}, str(path),
              metadata={"format": "csv_callback.salience/1", "json": json.dumps(meta)})
    return sv


@pytest.mark.parametrize("metric, score_range", [("acc", (0.0, 1.0)), ("acc_norm", (-math.inf, math.inf))])
def test_format_1_files_load_with_the_range_their_metric_names(tmp_path, metric, score_range):
    """Old "acc" vectors were fitted within [0, 1], old vectors of other metrics without bounds."""
    sv = _format_1_file(tmp_path / "old.safetensors", metric)
    old = SalienceVector.load(tmp_path / "old.safetensors")
    assert old.score_range == score_range and old.metric == metric and old.link == sv.link
    losses = np.random.default_rng(0).uniform(0, 5, (7, 5))
    assert np.array_equal(old.predict(losses), sv.predict(losses))
    old.save(tmp_path / "new.safetensors")  # re-saved in the current format, with the range
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "csv_callback.salience/2"
    assert SalienceVector.load(tmp_path / "new.safetensors").score_range == score_range


def test_shipped_vectors_load_with_their_range_and_probe():
    from pathlib import Path

    assets = Path(__file__).resolve().parents[1] / "examples" / "assets"
    probe = ProbeSet.load(assets / "probe.safetensors")
    for path in sorted(assets.glob("ladder_*.safetensors")):
        sv = SalienceVector.load(path)
        assert sv.score_range == (0.0, 1.0)
        sv.check_probe(probe)


def test_vector_without_a_fingerprint_is_refused_where_a_probe_is_given(tokenizer):
    probe = ProbeSet.from_texts(["one two three four five six"], tokenizer, 64)
    sv = make_vector(n=probe.n_tokens, fingerprint="")
    fix = r"has no probe fingerprint .*re-fit it with fit_salience\(\.\.\., probe=probe\).*probe_fingerprint = probe"
    with pytest.raises(ProbeMismatchError, match=fix):
        sv.check_probe(probe)
    with pytest.raises(ProbeMismatchError, match=fix):
        sv.predict(np.ones(probe.n_tokens), fingerprint=probe.fingerprint)
    assert isinstance(sv.predict(np.ones(probe.n_tokens)), float)  # no probe given: nothing to check against


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth, reason", [(100_000, "its metadata is JSON nested too deeply for Python to parse"),
                                           (200, "fit_report nests objects and lists more than 32 levels deep")])
def test_deeply_nested_fit_report_is_refused_naming_the_file(tmp_path, depth, reason):
    """A fit_report nested 100000 deep raised RecursionError from json.loads; one nested 200 deep loaded and
    could raise it later, in json.dumps or a report's walk."""
    make_vector().save(tmp_path / "good.safetensors")
    with safe_open(str(tmp_path / "good.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["json"])
    text = json.dumps({**meta, "fit_report": "REPORT"}).replace('"REPORT"', _nested(depth))
    path = _variant(tmp_path, "nested.safetensors", raw_json=text)
    pattern = f"{re.escape(str(path))} is not a valid csv_callback salience vector file: {reason}; re-fit"
    with pytest.raises(ValueError, match=pattern):
        SalienceVector.load(path)
