"""The project's link on real data: AI2's OLMo ladder (step 2), 7B and 13B predicted from their task loss.

The data lives beside the clone (``../shared/data/olmo-ladder/step2.json``, as in CI; see ``shared_file`` in
conftest.py); the errors of ``fit_link`` must stay at or below the reference fit that the data's README reports,
task by task.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TOL = 1e-4  # accuracy as a fraction: 0.01 points


@pytest.fixture(scope="module")
def olmo(benchmark_script):
    return benchmark_script("olmo_link.py")


@pytest.fixture(scope="module")
def step2(shared_file) -> Path:
    return shared_file("data/olmo-ladder/step2.json")


@pytest.fixture(scope="module")
def data(step2, olmo):
    return olmo.load(step2)


@pytest.fixture(scope="module")
def rows(olmo, data):
    return {r["task"]: r for r in olmo.evaluate(data)}


def test_all_ten_tasks_fitted_on_the_1401_ladder_points(rows, data):
    assert set(rows) == set(data["tasks"]) and len(rows) == 10
    for r in rows.values():
        assert r["n"] == 1401
        lo, hi, k, L0 = r["link"]
        # The OLMo box: hi = b in [0, 1], span = -a in [0, 1], k > 0, L0 >= 0.
        assert 0.0 <= hi <= 1.0 and 0.0 <= hi - lo <= 1.0 and k > 0 and L0 >= 0


@pytest.mark.parametrize("task", ["mmlu", "hellaswag", "arc_challenge", "arc_easy", "piqa", "csqa", "socialiqa",
                                  "openbookqa", "winogrande", "boolq"])
@pytest.mark.parametrize("target", ["7B-4T", "13B-5T"])
def test_target_error_at_or_below_reference(rows, task, target):
    d = rows[task][target]
    assert d["abs_err"] <= d["ref_abs_err"] + TOL, (
        f"{task} {target}: |pred - actual| = {d['abs_err']:.5f} (pred {d['pred']:.5f}, actual {d['actual']:.5f}) "
        f"exceeds the reference fit's {d['ref_abs_err']:.5f}"
    )


def test_headline_means_match_the_readme(rows):
    # README: mean over the 8 main tasks, 7B 2.37 points, 13B 2.40 points.
    main = [r for r in rows.values() if r["main_set"]]
    assert len(main) == 8
    assert np.mean([r["7B-4T"]["abs_err"] for r in main]) * 100 <= 2.37 + 0.01
    assert np.mean([r["13B-5T"]["abs_err"] for r in main]) * 100 <= 2.40 + 0.01


def test_reference_table_agrees_with_published_numbers(olmo, data):
    # The README's rounded table (the fallback reference) must be the paper repository's numbers.
    for name, task in data["tasks"].items():
        published = task["published_step2"]
        ref_7b, ref_13b = (p / 100 for p in olmo.REFERENCE_PRED[name])
        actual_7b = task["targets"]["7B-4T"][1]
        assert ref_7b == pytest.approx(actual_7b * (1 + published["7B-4T_rel_err_variance_csv"]), abs=5e-5 + 1e-9)
        if "13B-5T_pred_step2_main_csv" in published:
            assert ref_13b == pytest.approx(published["13B-5T_pred_step2_main_csv"], abs=5e-5 + 1e-9)
