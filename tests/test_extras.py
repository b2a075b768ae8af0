"""Optional extras: the core imports no framework, and an adapter whose extra is missing names the pip command.

A missing package is simulated in a fresh interpreter by a meta-path finder that refuses it as an uninstalled
package would be refused (``ModuleNotFoundError`` with its name), before any installed copy is found.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from csv_callback._extras import EXTRAS, extra_imports

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ["lightning", "transformers", "tokenizers", "wandb", "matplotlib", "tqdm", "accelerate", "lm_eval"]
CORE = ["csv_callback", "csv_callback.evaluator", "csv_callback.fit", "csv_callback.store", "csv_callback.probe",
        "csv_callback.salience", "csv_callback.losses"]

_BLOCK = """
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

BLOCKED = set(sys.argv[1].split(","))
sys.meta_path.insert(0, _NotInstalled())
"""


def run_without(blocked: list[str], code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which the ``blocked`` packages are not installed."""
    return subprocess.run([sys.executable, "-c", _BLOCK + code, ",".join(blocked)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


_IMPORT_CORE = f"""
import importlib, json
for m in {CORE!r}:
    importlib.import_module(m)
print(json.dumps(sorted({{m.partition(".")[0] for m in sys.modules}} & {set(OPTIONAL)!r})))
"""


def test_core_imports_without_any_optional_package():
    out = run_without(OPTIONAL, _IMPORT_CORE)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_core_imports_load_no_framework_when_all_are_installed():
    out = run_without([], _IMPORT_CORE)
    assert out.returncode == 0, out.stderr
    # torch.hub imports tqdm whenever it is installed; that is torch's doing, and the core works without it.
    assert set(json.loads(out.stdout)) <= {"tqdm"}


@pytest.mark.parametrize(
    ("blocked", "code", "extra", "missing"),
    [
        ("lightning", "import csv_callback.callback", "lightning", "lightning"),
        ("lightning", "from csv_callback.callback import SalienceCallback", "lightning", "lightning"),
        ("transformers", "import csv_callback.hf", "hf", "transformers"),
        ("transformers", "import csv_callback.collect", "cli", "transformers"),
        ("tqdm", "import csv_callback.collect", "cli", "tqdm"),
        ("transformers", "from csv_callback.cli import main; main(['probe', '--help'])", None, None),
        ("transformers", "from csv_callback.cli import main\nmain(['probe', 'x.txt', '--tokenizer', 'tok', "
                         "'--out', 'p.safetensors'])", "cli", "transformers"),
        ("matplotlib", "from csv_callback.report import write_report; write_report(None, 'out')", "report",
         "matplotlib"),
        ("tokenizers", "from csv_callback.testing import train_tokenizer; train_tokenizer(['a b'])", "hf",
         "tokenizers"),
    ],
    ids=["callback", "callback-class", "hf", "collect-transformers", "collect-tqdm", "cli-help",
         "cli-probe", "report", "testing-tokenizer"],
)
def test_missing_extra_names_the_pip_command(blocked, code, extra, missing, tmp_path):
    out = run_without([blocked], code, cwd=tmp_path)
    if extra is None:  # the CLI itself (its help) needs no extra
        assert out.returncode == 0, out.stderr
        return
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: "), out.stderr
    assert f"needs '{missing}', which is not installed" in last
    assert last.endswith(f"pip install 'csv-callback[{extra}]'")


def test_an_installed_package_that_fails_to_import_keeps_its_own_error():
    # A ModuleNotFoundError is what an uninstalled package raises; any other ImportError (a broken build) says
    # more about what is wrong than a pip command would.
    with pytest.raises(ImportError, match="broken build") as info, extra_imports("lightning", "csv_callback.callback"):
        raise ImportError("broken build")
    assert "pip install" not in str(info.value)


def test_unknown_extra_is_refused():
    with pytest.raises(ValueError, match="unknown extra 'lighting'"), extra_imports("lighting", "x"):
        pass


def test_extras_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) == set(declared) - {"dev"}


def test_every_dependency_has_a_lower_bound():
    pytest.importorskip("tomllib")  # the lower-bounds job's constraints generator reads pyproject.toml with it
    out = subprocess.run([sys.executable, str(ROOT / ".ci" / "lower-bounds-constraints.py"),
                          str(ROOT / "pyproject.toml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pins = dict(line.split("==") for line in out.stdout.split())
    assert {"torch", "numpy", "scipy", "safetensors", "threadpoolctl", "lightning", "transformers"} <= set(pins)


def test_wheel_ships_py_typed_and_the_license(tmp_path):
    # Built from a copy: setuptools leaves build/ and egg-info behind in the tree it builds.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "csv_callback", src / "csv_callback", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    pytest.importorskip("setuptools", minversion="77")  # the build backend as installed (no download); 77: PEP 639
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("csv_callback-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "csv_callback/py.typed" in names
    license_file = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    assert "Apache License" in zipfile.ZipFile(wheel).read(license_file).decode()
