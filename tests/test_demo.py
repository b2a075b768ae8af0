"""The shipped ladder vectors and the README's demo, run for real (short) with lm-eval-harness and W&B offline.

Needs the optional extra: ``pip install -e ".[lmeval]"``.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from offline_helpers import one_torch_thread, subprocess_env

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's "hf" model backend

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "examples" / "assets"
DEMO = ROOT / "examples" / "train_tiny_lm.py"
SHORT_RUN = ["--size", "s1", "--steps", "60", "--val-every", "20", "--lmeval-every", "2", "--threads", "1"]
sys.path.insert(0, str(ROOT / "benchmarks" / "ladder"))
sys.path.insert(0, str(ROOT / "examples"))

from world import TASKS, World  # noqa: E402

from csv_callback import ProbeSet, SalienceVector  # noqa: E402


def test_shipped_vectors_match_the_shipped_probe_and_the_worlds_tokenizer():
    probe = ProbeSet.load(ASSETS / "probe.safetensors")
    probe.check_tokenizer(World().tokenizer)  # the demo rebuilds the tokenizer; it must be the one fitted on
    for task in TASKS:
        vector = SalienceVector.load(ASSETS / f"{task}.safetensors")
        assert vector.task == task and vector.metric == "acc"
        vector.check_probe(probe)
        report = vector.fit_report
        # Fitted on every ladder checkpoint, cross-validated over whole mixtures.
        assert report["cv"] == "groups" and report["n_checkpoints"] >= 4 * 6 * 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import train_tiny_lm

    out = tmp_path_factory.mktemp("demo")
    with one_torch_thread():
        result = train_tiny_lm.main(["--out", str(out), *SHORT_RUN])
    return out, result


def test_demo_predicts_every_validation_and_measures_with_lm_eval(demo):
    out, result = demo
    history, measured = result["history"], result["measured"]
    assert sorted({(r["step"], r["task"]) for r in history}) == [(s, t) for s in (20, 40, 60) for t in sorted(TASKS)]
    assert all(0.0 <= r["pred"] <= 1.0 for r in history)
    # The forecast of the final score at every validation, inside its interval; the last one is made at the end.
    assert all(0.0 <= r["forecast_lo"] <= r["forecast"] <= r["forecast_hi"] <= 1.0 for r in history)
    assert all(r["forecast"] == r["pred"] for r in history if r["step"] == 60)
    # lm-eval ran at the 2nd validation and at the last one, on all three tasks.
    assert [r["step"] for r in measured] == [40, 60]
    assert all(0.0 <= r[t] <= 1.0 for r in measured for t in TASKS)
    assert (out / "pred_vs_lmeval.png").stat().st_size > 10_000
    assert len(list((out / "probe_losses" / "losses").glob("*.safetensors"))) == 3


def test_demo_streams_predictions_and_lm_eval_accuracy_to_wandb(demo):
    _, result = demo
    run_dir = str(Path(result["logger_dir"]).parent)
    summary = json.loads(
        subprocess.run(
            ["wandb", "leet", "inspect", "--summary", "--json", run_dir],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )["summary"]
    last = result["measured"][-1]
    for task in TASKS:
        preds = [r["pred"] for r in result["history"] if r["task"] == task]
        assert summary[f"csv/{task}/pred"] == {"max": pytest.approx(max(preds), abs=1e-6)}
        assert summary[f"lmeval/{task}/acc"] == pytest.approx(last[task])


def test_demo_png_title_names_the_mixture_in_words(demo, tmp_path):
    import train_tiny_lm

    _, result = demo
    figure = train_tiny_lm.plot(result["history"], result["measured"], tmp_path / "plot.png")
    title = figure.axes[0].get_title()
    assert "{" not in title and "facts 15%, arith 25%, pattern 6%, general text 54% of the training lines" in title
    # The forecast panel: one band per task, and the final accuracy lm-eval measured as a line.
    from matplotlib.collections import PolyCollection

    bands = [c for c in figure.axes[1].collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(TASKS) and "step-60" in figure.axes[1].get_title()


def test_demo_console_is_progress_lines_and_the_table_and_a_rerun_starts_over(demo):
    # As the README runs it: a fresh process, from the clone, and again into the --out of a finished run.
    out, _ = demo
    run = subprocess.run([sys.executable, str(DEMO), "--out", str(out), *SHORT_RUN], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr
    # Nothing but our own output: no progress bars, library notices or third-party deprecations on stderr.
    assert run.stderr == ""
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("Training GPT-2 s1 (") and "for 60 steps" in lines[0]
    assert lines[1] == "  facts 15%, arith 25%, pattern 6%, general text 54% of the training lines."
    assert lines[2].startswith("Predicting facts, arith, pattern accuracy") and lines[3].startswith("lm-eval-harness")
    assert re.fullmatch(r"  step 20/60 +\d+ s  predicted", lines[4]), lines[4]
    for line, step in zip(lines[5:7], (40, 60)):
        assert re.fullmatch(rf"  step {step}/60 +\d+ s  predicted; lm-eval-harness measured in \d+ s", line), line
    header = ["step"] + [word for task in ("facts", "arith", "pattern") for word in (task, "pred", "lm-eval")]
    assert lines[7].split() == header
    assert [line.split()[0] for line in lines[8:11]] == ["20", "40", "60"]
    assert lines[11].startswith("prediction vs lm-eval over 2 evaluations")
    assert lines[12].startswith("forecast of the step-60 accuracy made at each validation")
    assert lines[13].split() == ["step", "facts", "arith", "pattern"]
    for line, step in zip(lines[14:17], (20, 40, 60)):
        assert re.fullmatch(rf" +{step}" + r"( +0\.\d{3} \[[01]\.\d\d, [01]\.\d\d\]){3}", line), line
    assert re.fullmatch(r" +final( +[01]\.\d{3} +\(lm-eval\)){3}", lines[17]), lines[17]
    assert lines[18].startswith("done in ")
    assert len(lines) == 19, run.stdout
    assert len(list((out / "probe_losses" / "losses").glob("*.safetensors"))) == 3
