"""Print a pip constraints file pinning every dependency of pyproject.toml to its lower bound (``name==X``).

``--check`` instead compares the installed versions with those bounds and exits 1 naming any that differ, so
the lower-bounds job cannot pass on versions it did not mean to test. Every requirement must have a ``>=``
bound, and a package named twice (in several extras) must have the same bound everywhere.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib  # standard library from Python 3.11 on (the job needs 3.11); ruff's py310 target sorts it apart

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*$")


def lower_bounds(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    own = project["name"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    bounds: dict[str, str] = {}
    for req in reqs:
        if req.split("[")[0].strip() == own:
            continue  # an extra made of other extras
        m = _REQ.match(req)
        if not m:
            sys.exit(f"{pyproject}: {req!r} has no plain '>=' lower bound; every dependency needs one.")
        name, low = m.group(1).lower().replace("_", "-"), m.group(2)
        if bounds.setdefault(name, low) != low:
            sys.exit(f"{pyproject}: {name} has the lower bounds {bounds[name]} and {low}; give it one.")
    return bounds


def _release(v: str) -> tuple[str, ...]:
    """``2.4``, ``2.4.0`` and ``2.4.0+cpu`` (a local build label) are one release."""
    parts = v.split("+")[0].split(".")
    while len(parts) > 1 and parts[-1] == "0":
        parts.pop()
    return tuple(parts)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    bounds = lower_bounds(Path(paths[0] if paths else "pyproject.toml"))
    if not check:
        print("\n".join(f"{name}=={low}" for name, low in sorted(bounds.items())))
        return 0
    wrong = []
    for name, low in sorted(bounds.items()):
        try:
            got = version(name)
        except PackageNotFoundError:
            got = "not installed"
        if _release(got) != _release(low):
            wrong.append(f"{name} {got} (lower bound {low})")
        print(f"{name}=={got}")
    if wrong:
        print("not at their lower bounds: " + "; ".join(wrong), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
