"""`csv-callback scaling`: a scaling law of the weighted loss fitted to real loss stores (one per run of a ladder,
with N and D recorded as the callbacks record them), the prediction at a new (N, D), the plot, and the errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from csv_callback import ProbeSet, SalienceVector
from csv_callback.cli import main
from csv_callback.salience import SigmoidLink
from csv_callback.scaling import fit_scaling_law, predict_score
from csv_callback.store import LossStore

TRUE = {"E": 1.5, "A": 40.0, "alpha": 0.3, "B": 300.0, "beta": 0.35}  # the law the ladder's losses follow
SIZES = (2e4, 6e4, 2e5)
RUN_TOKENS = {"short": 1e7, "long": 3e7}  # two runs per size, of different lengths: their finals differ in D
TARGET = (6e5, 3e7)


def true_loss(n: float, d: float) -> float:
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


@pytest.fixture(scope="module")
def probe(tokenizer) -> ProbeSet:
    return ProbeSet.from_texts(["A short probe for the scaling law tests, a few dozen tokens long."], tokenizer, 32)


@pytest.fixture(scope="module")
def vector(probe) -> SalienceVector:
    w = np.random.default_rng(0).random(probe.n_tokens)
    return SalienceVector(weights=w / w.sum(), link=SigmoidLink(lo=0.25, hi=1.0, k=3.0, L0=2.2), task="t",
                          probe_fingerprint=probe.fingerprint, tokenizer_hash=probe.tokenizer_hash,
                          loss_range=(1.8, 3.5), score_range=(0.0, 1.0),
                          fit_report={"interval": {"method": "split-conformal",
                                                   "abs_residuals": [0.002 * i for i in range(1, 21)]}})


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, probe, vector):
    """Six stores (3 sizes x 2 run lengths), 6 checkpoints each plus a step-0 evaluation (D = 0), whose per-token
    losses are the true law times 1 +- 0.5% noise, and the vector saved beside them."""
    root = tmp_path_factory.mktemp("ladder")
    rng = np.random.default_rng(1)
    stores = []
    for n in SIZES:
        for run, d_end in RUN_TOKENS.items():
            store = LossStore(root / f"n{int(n)}-{run}", probe)
            store.write("step-000000000", np.full(probe.n_tokens, 9.0), step=0, tokens_seen=0.0, params=n)
            for k, d in enumerate(np.geomspace(d_end / 300, d_end, 6), start=1):
                losses = true_loss(n, d) * (1 + 0.005 * rng.standard_normal()) * np.ones(probe.n_tokens)
                store.write(f"step-{k:09d}", losses, step=k, tokens_seen=float(d), params=n)
            stores.append(str(store.root))
    vector.save(root / "t.safetensors")
    return stores, str(root / "t.safetensors")


def run_json(capsys, *args: str) -> dict:
    assert main(["scaling", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def target_args(level: str = "0.8") -> list[str]:
    return ["--target-params", str(TARGET[0]), "--target-tokens", str(TARGET[1]), "--level", level]


def test_the_law_of_every_checkpoint_predicts_a_larger_model_through_the_vector(capsys, ladder, vector):
    stores, vector_file = ladder
    out = run_json(capsys, *stores, "--vector", vector_file, *target_args())
    assert len(out["points"]) == 36 and min(p["tokens_seen"] for p in out["points"]) > 0  # step 0 left out
    assert {p["params"] for p in out["points"]} == set(SIZES)
    # The same law and prediction as the library's, on the stores' weighted losses.
    points = out["points"]
    law = fit_scaling_law(*([p[k] for p in points] for k in ("params", "tokens_seen", "weighted_loss")))
    assert out["law"] == law.to_dict()
    t = out["target"]
    assert (t["score"], t["score_lo"], t["score_hi"]) == pytest.approx(predict_score(law, vector, *TARGET, 0.8))
    assert t["weighted_loss"] == pytest.approx(law.predict(*TARGET))
    # The ladder follows the true law, so the larger model's true loss is predicted, inside its interval.
    truth = true_loss(*TARGET)
    assert t["weighted_loss"] == pytest.approx(truth, rel=0.01)
    assert t["weighted_loss_lo"] < truth < t["weighted_loss_hi"]
    assert t["score_lo"] < float(vector.link(truth)) < t["score_hi"]
    # The table says the same.
    assert main(["scaling", *stores, "--vector", vector_file, *target_args()]) == 0
    text = capsys.readouterr().out
    assert str(law) in text and "fitted to 36 checkpoints of 6 store(s)" in text
    assert f"weighted loss {t['weighted_loss']:.4f}  [{t['weighted_loss_lo']:.4f}, {t['weighted_loss_hi']:.4f}]" in text
    assert f"t acc {t['score']:.4f}  [{t['score_lo']:.4f}, {t['score_hi']:.4f}]" in text


def test_final_only_fits_one_point_per_run_and_a_wider_interval_at_a_higher_level(capsys, ladder):
    stores, vector_file = ladder
    out = run_json(capsys, *stores, "--vector", vector_file, "--final-only", *target_args())
    finals = [(6, d) for _ in SIZES for d in RUN_TOKENS.values()]
    assert [(p["step"], p["tokens_seen"]) for p in out["points"]] == finals
    assert out["law"]["n_points"] == 6 and out["final_only"] is True
    t80 = out["target"]
    t95 = run_json(capsys, *stores, "--vector", vector_file, "--final-only", *target_args("0.95"))["target"]
    assert t95["weighted_loss"] == t80["weighted_loss"]
    assert t95["weighted_loss_lo"] < t80["weighted_loss_lo"] and t95["weighted_loss_hi"] > t80["weighted_loss_hi"]


def test_plot_draws_the_ladder_and_the_target(capsys, ladder, tmp_path):
    stores, vector_file = ladder
    png = tmp_path / "law.png"
    assert main(["scaling", *stores, "--vector", vector_file, *target_args(), "--plot", str(png)]) == 0
    assert f"plot: {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def error_of(capsys, *args: str) -> str:
    assert main(["scaling", *args]) == 2
    return capsys.readouterr().err


def test_stores_without_n_or_d_another_probe_or_too_few_points_are_refused(capsys, ladder, probe, tokenizer,
                                                                          tmp_path):
    stores, vector_file = ladder
    old = LossStore(tmp_path / "old", probe)
    old.write("step-000000001", np.full(probe.n_tokens, 3.0), step=1, tokens_seen=1e6)  # params not recorded
    err = error_of(capsys, *stores, str(old.root), "--vector", vector_file, *target_args())
    assert "['step-000000001'] record no parameter count or no tokens seen" in err
    assert "LossStore.write(..., tokens_seen=D, params=N)" in err and "include_num_input_tokens_seen" in err
    other = ProbeSet.from_texts(["Another probe text, so another fingerprint, of a few tokens."], tokenizer, 32)
    foreign = LossStore(tmp_path / "foreign", other)
    foreign.write("step-000000001", np.full(other.n_tokens, 3.0), step=1, tokens_seen=1e6, params=1e4)
    err = error_of(capsys, str(foreign.root), "--vector", vector_file, *target_args())
    assert f"these losses come from probe {other.fingerprint}" in err
    err = error_of(capsys, *stores[:4], "--vector", vector_file, "--final-only", *target_args())
    assert "only 4 checkpoint(s) were found with --final-only (one per store); pass more runs' stores." in err
    err = error_of(capsys, *stores, stores[0], "--vector", vector_file, *target_args())
    assert "is given twice" in err
    err = error_of(capsys, *stores, "--vector", vector_file, "--target-params", "0", "--target-tokens", "1e7")
    assert "--target-params and --target-tokens must be positive numbers" in err
