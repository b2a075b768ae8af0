"""Tests that need the data beside the clone (``../shared``) skip with a reason in a user's clone, and fail in CI.

Each case runs pytest in a subprocess on copies of ``conftest.py``, ``test_olmo_link.py`` and the module it tests,
laid out as in the repository in a fresh directory with no ``shared`` beside it: what a user's clone looks like,
or a CI runner that lost its data.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from offline_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
N_TESTS = 23  # test_olmo_link.py's tests, all of which read the ladder data


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """``<tmp>/clone`` holding the three files; ``<tmp>/shared`` does not exist."""
    clone = tmp_path_factory.mktemp("user") / "clone"
    for name in ("tests/conftest.py", "tests/test_olmo_link.py", "benchmarks/olmo_link.py"):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, clone / name)
    return clone


def _pytest(clone: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in subprocess_env().items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "tests"], cwd=clone,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def test_a_clone_without_the_shared_data_skips_saying_what_is_needed_and_where(clone):
    run = _pytest(clone, ci=None)
    expected = clone.parent / "shared" / "data" / "olmo-ladder" / "step2.json"
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{N_TESTS} skipped" in run.stdout and "failed" not in run.stdout and "error" not in run.stdout, run.stdout
    assert f"needs the shared data, expected at {expected}" in run.stdout, run.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_in_ci_missing_shared_data_fails_every_test_instead_of_skipping(clone, ci):
    run = _pytest(clone, ci=ci)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{N_TESTS} errors" in run.stdout and "skipped" not in run.stdout, run.stdout
    assert f"CI={ci!r}: this test needs the shared data" in run.stdout, run.stdout
    assert "CI must provide it" in run.stdout

