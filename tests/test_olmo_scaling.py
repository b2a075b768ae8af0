"""AI2's two-step task scaling law reproduced with csv_callback.scaling: OLMo 2 13B (and 7B) from (N, D) alone.

``benchmarks/olmo_scaling.py`` runs step 1 (task bpb from (N, D), one point per ladder run) and the chained
prediction (step 2's sigmoid at step 1's predicted bpb) on AI2's OLMo ladder, as the paper's repository does; its
errors must be at or below the published ones (``published/step1_main.csv``, ``published/chained_main.csv``) task
by task, within rounding, and the domain-vector chains committed in ``benchmarks/results/olmo_scaling.json`` must
come out again. The data lives beside the clone (``../shared/data/olmo-ladder``, as in CI; see ``shared_file``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "results" / "olmo_scaling.json"
MAIN = ("mmlu", "hellaswag", "arc_challenge", "arc_easy", "piqa", "csqa", "socialiqa", "openbookqa")
REL_TOL = 5e-4  # relative errors: the published ones are rounded to nowhere near this, so this is "within rounding"
PRED_RTOL = 1e-3  # the same fit: predictions equal the published ones to 0.1% relative
TOL = 1e-4  # accuracy as a fraction: 0.01 points, as tests/test_olmo_domains.py


@pytest.fixture(scope="module")
def osc(benchmark_script):
    return benchmark_script("olmo_scaling.py")


@pytest.fixture(scope="module")
def data(shared_file, osc):
    return osc.load(shared_file("data/olmo-ladder/configs/final.json").parents[1])


@pytest.fixture(scope="module")
def rows(osc, data):
    return {r["task"]: r for r in osc.evaluate(data)}


def test_step1_points_are_the_16_ladder_runs_and_the_13b_tokens_are_step_times_batch(data, osc):
    runs = data["runs1"]
    assert len(runs) == 16 and len({r["size"] for r in runs}) == 4
    for run in runs:
        last = run["last"][-1]  # the ladder runs record both: the 13B's rule agrees with their totals
        assert float(last["_step"]) * float(last["batch_size_in_tokens"]) == float(last["throughput/total_tokens"])
        assert len(run["last"]) == 5
    target = data["targets1"]["13B-5T"]
    assert target["tokens"] == 596057 * 8388608 and [int(r["_step"]) for r in target["last"]] == [
        593000, 594000, 595000, 596000, 596057]
    assert data["targets1"]["7B-4T"]["tokens"] == 3945065873408


@pytest.mark.parametrize("task", MAIN)
def test_step1_matches_ai2s_published_prediction(rows, task):
    d, published = rows[task]["13B-5T"]["step1"]["bpb"], rows[task]["published_13B"]["step1"]
    assert d["actual"] == pytest.approx(published["Actual"], rel=1e-12)
    assert d["pred"] == pytest.approx(published["Pred"], rel=PRED_RTOL)
    assert abs(d["rel_err"]) <= abs(published["Rel Error"]) + REL_TOL, (task, d["rel_err"], published["Rel Error"])
    assert rows[task]["law"]["bpb"]["fit_rel_err"] == pytest.approx(published["Fit Error"], abs=REL_TOL)


@pytest.mark.parametrize("task", MAIN)
def test_chained_matches_ai2s_published_prediction(rows, task):
    d, published = rows[task]["13B-5T"]["chain"]["bpb"], rows[task]["published_13B"]["chained"]
    assert rows[task]["13B-5T"]["actual"] == pytest.approx(published["Actual"], rel=1e-12)
    assert d["pred"] == pytest.approx(published["Pred"], rel=PRED_RTOL)
    # chained_main.csv's "Rel Error" is |pred - actual| / actual.
    assert abs(d["rel_err"]) <= published["Rel Error"] + REL_TOL, (task, d["rel_err"], published["Rel Error"])


def test_chained_mean_error_at_or_below_published(osc, rows):
    means = osc.summary(list(rows.values()))["13B-5T"]
    assert means["bpb"]["mean_abs_err_points"] <= means["published_bpb"]["mean_abs_err_points"] + 0.01


def test_domain_chained_numbers_come_out_again(osc, rows):
    committed = json.loads(COMMITTED.read_text())
    assert [r["task"] for r in committed["tasks"]] == list(rows)
    for saved in committed["tasks"]:
        r = rows[saved["task"]]
        for target in osc.TARGETS:
            for chain, s in saved[target]["chain"].items():
                d, where = r[target]["chain"][chain], (saved["task"], target, chain)
                assert d["pred"] == pytest.approx(s["pred"], abs=TOL), where
                assert d["interval"] == pytest.approx(s["interval"], abs=TOL), where
                assert d["covers"] == s["covers"], where
            for chain, s in saved[target]["step1"].items():
                assert r[target]["step1"][chain]["pred"] == pytest.approx(s["pred"], rel=1e-4), (saved["task"], chain)
    means = osc.summary(list(rows.values()))
    for target in osc.TARGETS:
        for chain in osc.CHAINS:
            got, want = means[target][chain], committed["summary"][target][chain]
            assert got["mean_abs_err_points"] == pytest.approx(want["mean_abs_err_points"], abs=0.01)
            assert got["covered"] == want["covered"]
