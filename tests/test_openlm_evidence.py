"""Domain vectors on real LLMs: the open_lm suite's numbers in BENCHMARKS.md are what the fit gives.

``benchmarks/openlm/evaluate.py`` fits one domain vector per task on the 104 open_lm models of
``../shared/data/openlm-scaling/models.csv`` (see ``shared_file`` in conftest.py), holding one training corpus out
per fold, and commits its result to ``benchmarks/openlm/data/evaluate.json``. The fit is deterministic: refitting
three of its tasks must give the committed held-out errors, and the committed summary must follow from its rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "openlm" / "data" / "evaluate.json"
REL = 1e-6
# The task with the largest gain over loss averaging, a typical one, and the one where csv does not beat it.
TASKS = ("bigbench_qa_wikidata", "hellaswag", "boolq")


@pytest.fixture(scope="module")
def openlm(benchmark_script):
    return benchmark_script("openlm/evaluate.py")


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(COMMITTED.read_text())


@pytest.fixture(scope="module")
def data(shared_file, openlm):
    return openlm.load(shared_file("data/openlm-scaling/models.csv"))


@pytest.fixture(scope="module")
def vectors(openlm, data):
    return {t: openlm.fit_task(data, t) for t in TASKS}


def test_suite_is_104_models_on_three_corpora_and_8_domains(data, committed):
    assert data["losses"].shape == (104, 8)
    assert {c: data["corpus"].count(c) for c in set(data["corpus"])} == committed["data"]["corpora"]
    assert data["domains"] == committed["data"]["domains"]


@pytest.mark.parametrize("task", TASKS)
def test_refit_reproduces_committed_row(openlm, vectors, committed, task):
    vector = vectors[task]
    # One corpus held out per fold: the three folds are the three corpora.
    report = vector.fit_report
    assert report["cv"] == "groups" and len(set(report["folds"])) == 3
    assert vector.domains == tuple(committed["data"]["domains"])
    row = openlm.task_row(vector)
    want = next(r for r in committed["rows"] if r["task"] == task)
    for method in openlm.METHODS:
        assert row["cv_mse"][method] == pytest.approx(want["cv_mse"][method], rel=REL), (task, method)
        assert row["cv_mae"][method] == pytest.approx(want["cv_mae"][method], rel=REL), (task, method)
    assert row["lam"] == want["lam"] and row["best_domain"] == want["best_domain"]
    assert row["weights"] == pytest.approx(want["weights"], rel=REL, abs=1e-9)


def test_committed_summary_follows_from_its_rows(openlm, committed):
    rows = committed["rows"]
    assert [r["task"] for r in rows] == list(openlm.TASKS)
    summary, stored = openlm.summary(rows), committed["summary"]
    for method in openlm.METHODS:
        geo = math.exp(np.mean([math.log(r["cv_mse"][method]) for r in rows]))
        assert stored["geo_mean_mse"][method] == pytest.approx(geo, rel=REL)
    assert stored["csv_over_uniform"] == pytest.approx(summary["csv_over_uniform"], rel=REL)
    assert stored["csv_over_domain"] == pytest.approx(summary["csv_over_domain"], rel=REL)
    assert stored["target_met"] == summary["target_met"]
    # Issue 15's target: geometric-mean csv MSE at most half loss averaging's and below the best single domain's.
    assert stored["target_met"] is True
