"""Imports of optional dependencies: a missing one fails with the pip command of the extra that brings it.

The core (probe, losses, salience, fit, store, evaluator) needs torch, numpy, scipy, safetensors and
threadpoolctl only; each adapter module imports its framework inside :func:`extra_imports`::

    with extra_imports("lightning", __name__):
        import lightning.pytorch as pl
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

EXTRAS = ("lightning", "hf", "wandb", "report", "lmeval", "cli", "all")


@contextmanager
def extra_imports(extra: str, user: str) -> Iterator[None]:
    """Turn a ``ModuleNotFoundError`` of the imports in the block into one naming ``pip install 'csv-callback[extra]'``.

    Args:
        extra: the extra of ``pyproject.toml`` that installs the block's packages (one of :data:`EXTRAS`).
        user: the importing module's ``__name__``, named in the message.

    Only a module that is not installed is translated: an installed package that fails while importing
    (a broken build, a version clash) raises its own error, which says more than a pip command would.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; pyproject.toml declares {', '.join(EXTRAS)}.")
    try:
        yield
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"{user} needs {e.name!r}, which is not installed; install the {extra!r} extra: "
            f"pip install 'csv-callback[{extra}]'",
            name=e.name,
        ) from e
