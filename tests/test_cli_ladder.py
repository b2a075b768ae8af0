"""`csv-callback fit` on the ladder benchmark's committed data as it lies, the README's command: every run's
lm-eval results record the same checkpoint names (``step-...``), so each file is matched by its run directory."""

import json
import subprocess
from pathlib import Path

from offline_helpers import subprocess_env

from csv_callback import SalienceVector

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "ladder" / "data"


def test_fit_reads_the_ladders_own_results_by_run_directory(tmp_path):
    runs = sorted((DATA / "runs").iterdir())
    assert len(runs) == 36
    vec = tmp_path / "facts.safetensors"
    # The README's command, as a shell runs it there.
    out = subprocess.run(f"csv-callback fit runs/*/losses --task ladder_facts --lmeval runs/*/lmeval "
                         f"--groups 're:^s\\d-([^/]+)/' --out {vec}", shell=True, cwd=DATA, capture_output=True,
                         text=True, timeout=600, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    rep = SalienceVector.load(vec).fit_report
    assert len(rep["checkpoints"]) == 36 * 9 and rep["cv"] == "groups" and len(set(rep["groups"])) == 9
    # Every checkpoint got its own run's accuracy, which the run also records in run.json.
    for name, score, source in zip(rep["checkpoints"], rep["scores"], rep["score_sources"]):
        run, _, step = name.split("/")
        assert Path(source).parent == Path("runs", run, "lmeval", step)  # relative, as given
        recorded = json.loads((DATA / "runs" / run / "run.json").read_text())["checkpoints"]
        assert score == next(c["ladder_facts"] for c in recorded if c["step"] == int(step.split("-")[1]))
    assert rep["cv_mse"]["csv"] < rep["cv_mse"]["uniform"]
