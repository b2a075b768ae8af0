"""Domain vectors on real LLMs: OLMo 2 7B and 13B predicted from their 11 validation-domain losses.

``benchmarks/olmo_domains.py`` fits on AI2's OLMo ladder as step 2 is fitted; the data lives beside the clone
(``../shared/data/olmo-ladder``, as in CI; see ``shared_file`` in conftest.py). The fit is deterministic, so the
numbers committed in ``benchmarks/results/olmo_domains.json`` (and BENCHMARKS.md's table) must come out again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "results" / "olmo_domains.json"
TOL = 1e-4  # accuracy as a fraction: 0.01 points, as tests/test_olmo_link.py


@pytest.fixture(scope="module")
def od(benchmark_script):
    return benchmark_script("olmo_domains.py")


@pytest.fixture(scope="module")
def data(shared_file, od):
    return od.load(shared_file("data/olmo-ladder/step2.json").parent)


@pytest.fixture(scope="module")
def rows(od, data):
    return {r["task"]: r for r in od.evaluate(data)}


@pytest.fixture(scope="module")
def committed():
    return json.loads(COMMITTED.read_text())


def test_domain_losses_are_smoothed_as_step2_smooths_accuracy(od, data):
    # step2_points, which makes the domain losses' ladder points, applied to step2.json's raw accuracies must give
    # exactly the points step 2 fits: then both inputs went through one drop and one trailing mean.
    assert data["X"].shape == (1401, 11) and len(set(data["sizes"])) == 4 and len(set(data["runs"])) == 16
    for task in data["tasks"].values():
        np.testing.assert_allclose(od.step2_points(task["raw_acc"], data["step2"]),
                                   [p[4] for p in task["ladder_points"]], rtol=0, atol=1e-12)


def test_c4_alone_reproduces_ai2s_published_step2_from_c4_loss(rows):
    # published/step2_c4_main.csv: AI2's 13B predictions from C4 loss. Ours, the c4_en domain through the same fit.
    main = [r for r in rows.values() if r["main_set"]]
    assert len(main) == 8
    for r in main:
        d = r["13B-5T"]
        assert d["pred"]["c4"] == pytest.approx(d["published_pred"]["c4"], abs=TOL), r["task"]


def test_committed_numbers_come_out_again(rows, committed):
    assert [r["task"] for r in committed["tasks"]] == list(rows)
    for saved in committed["tasks"]:
        r = rows[saved["task"]]
        assert r["best_domain"] == saved["best_domain"]
        np.testing.assert_allclose(list(r["csv_weights"].values()), list(saved["csv_weights"].values()), atol=1e-4)
        for target in ("7B-4T", "13B-5T"):
            for method, pred in saved[target]["pred"].items():
                assert r[target]["pred"][method] == pytest.approx(pred, abs=TOL), (saved["task"], target, method)
            assert r[target]["published_pred"] == pytest.approx(saved[target]["published_pred"], abs=1e-12)


def test_headline_means_and_verdict(od, rows, committed):
    means = od.summary(list(rows.values()))
    for target, saved in committed["mean_abs_err_points_main8"].items():
        assert means[target] == pytest.approx(saved, abs=0.01)
    # AI2's step 2 from task bpb, as the data's README reports it: 2.37 (7B) and 2.40 (13B) points.
    assert means["7B-4T"]["published_bpb"] == pytest.approx(2.37, abs=0.005)
    assert means["13B-5T"]["published_bpb"] == pytest.approx(2.40, abs=0.005)
    # Issue 15's target: the domain vector's mean absolute error no worse than step 2's from task bpb.
    for target in ("7B-4T", "13B-5T"):
        assert means[target]["csv"] <= means[target]["published_bpb"]
