"""examples/domain_vectors.py run for real (short): four validation dataloaders, the shipped domain vectors predicting
from the losses they log, and lm-eval-harness at the end.

Needs the optional extra: ``pip install -e ".[lmeval]"``.
"""

import contextlib
import csv
import io
import random
import re
import sys
from pathlib import Path

# Imported, not importorskip'd: with the test command's ".[dev]" (lmeval included) a skip here would only hide a
# missing extra from CI.
import accelerate  # noqa: F401  (lm-eval's "hf" model backend)
import lm_eval  # noqa: F401
import numpy as np
import pytest
from offline_helpers import one_torch_thread

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = ["--size", "s1", "--steps", "60", "--val-every", "20", "--threads", "1"]
sys.path.insert(0, str(ROOT / "benchmarks" / "ladder"))
sys.path.insert(0, str(ROOT / "examples"))

from world import DOMAINS, SOURCES, TASKS, TaskScorer, World, line_probe  # noqa: E402

from csv_callback import SalienceVector, token_losses  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import domain_vectors

    out = tmp_path_factory.mktemp("domains")
    stdout = io.StringIO()
    with one_torch_thread(), contextlib.redirect_stdout(stdout):
        result = domain_vectors.main(["--out", str(out), *SHORT_RUN])
    return result, stdout.getvalue()


def test_shipped_domain_vectors_weigh_the_four_ladder_domains():
    import domain_vectors

    for source, path in zip(SOURCES, domain_vectors.VECTORS):
        vector = SalienceVector.load(path)
        assert vector.domains == DOMAINS and vector.task == f"ladder_{source}"
        # Fitted on every ladder checkpoint, cross-validated over whole mixtures; the task's own source dominates.
        assert vector.fit_report["cv"] == "groups" and vector.fit_report["n_checkpoints"] == 324
        assert int(np.argmax(vector.weights)) == DOMAINS.index(source)


def test_every_validation_predicts_from_the_logged_domain_losses(run):
    import domain_vectors

    result, _ = run
    vectors = {v.task: v for v in map(SalienceVector.load, domain_vectors.VECTORS)}
    with open(Path(result["log_dir"]) / "metrics.csv") as f:
        logged = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    by_step: dict[int, dict[str, float]] = {}
    for row in logged:
        by_step.setdefault(int(row["step"]), {}).update(row)
    # Lightning's CSV step is the step the metrics were logged at: after validation k, step 20 k - 1.
    validations = {s + 1: m for s, m in by_step.items() if "csv/ladder_facts/pred" in m}
    assert sorted(validations) == [20, 40, 60] == [r["step"] for r in result["rows"]]
    for row in result["rows"]:
        metrics = validations[row["step"]]
        losses = {d: metrics[f"val/{d}/loss"] for d in DOMAINS}
        assert losses == pytest.approx(row["losses"], rel=1e-6) and all(np.isfinite(list(losses.values())))
        for task, vector in vectors.items():
            expected = float(vector.predict(vector.domain_losses(losses)))
            assert metrics[f"csv/{task}/pred"] == pytest.approx(expected, abs=1e-6)
            assert row["pred"][task] == pytest.approx(expected, abs=1e-6)
    # Losses fell over training, and the predictions moved with them: they come from this run's numbers.
    first, last = result["rows"][0], result["rows"][-1]
    assert all(last["losses"][d] < first["losses"][d] for d in DOMAINS)


def test_a_logged_domain_loss_is_the_mean_token_loss_the_vectors_were_fitted_on(run):
    # The vectors were fitted on the mean probe token loss of each domain's segment; a source's validation loss must
    # be that quantity on its lines (the probe's scoring), not a loss over padded or joined text.
    import domain_vectors

    result, _ = run
    world = World()
    for k, source in enumerate(SOURCES):
        rng = random.Random(domain_vectors.VALIDATION_SEED + k)
        probe = line_probe([world.line(source, rng) for _ in range(domain_vectors.VALIDATION_LINES)], world.tokenizer)
        mean = float(token_losses(result["model"], probe).double().mean())
        assert result["rows"][-1]["losses"][source] == pytest.approx(mean, rel=1e-4)


def test_lm_eval_measured_the_final_model_and_the_console_shows_it_next_to_the_predictions(run):
    result, stdout = run
    measured = result["measured"]
    assert sorted(measured) == sorted(TASKS)
    # lm-eval's acc is the in-process scorer's (tests/test_ladder_scorer.py checks the two agree) on the final model.
    scored = TaskScorer(World())(result["model"])
    assert measured == pytest.approx({t: scored[t]["acc"] for t in TASKS}, abs=1e-9)
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines[0].startswith("Training GPT-2 s1 for 60 steps on facts 15%, arith 25%, pattern 6%")
    steps = [line for line in lines if line.startswith("  step ")]
    assert [line.split()[1] for line in steps] == ["20/60", "40/60", "60/60"]
    assert all("-> predicted facts" in line for line in steps)
    final = result["rows"][-1]["pred"]
    cells = "  ".join(f"{t.removeprefix('ladder_')} {measured[t]:.3f} \\(predicted {final[t]:.3f}\\)" for t in TASKS)
    assert re.fullmatch(rf"lm-eval-harness at step 60 \(\d+ s\):  {cells}", lines[-2]), lines[-2]
    assert lines[-1].startswith("done in ")
