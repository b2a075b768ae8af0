"""The HTML report of a fitted vector: readable with many cross-validation groups, the best method marked,
legible salience shading, and a reason where a section is missing."""

import re

import matplotlib
import numpy as np
import pytest

from csv_callback import ProbeSet, fit_salience
from csv_callback.report import _cv_figure, write_report
from csv_callback.testing import synthetic_ladder

matplotlib.use("Agg")
SHARES = tuple(np.linspace(0.05, 0.6, 36))  # 36 data mixtures, as the ladder's 36 runs


@pytest.fixture(scope="module")
def probe(tokenizer, corpus) -> ProbeSet:
    return ProbeSet.from_texts([t[:300] for t in corpus[:3]], tokenizer, max_length=64)


@pytest.fixture(scope="module")
def vector(probe):
    """A vector cross-validated over 36 held-out groups, on losses shaped like the probe's."""
    lad = synthetic_ladder(n_tokens=probe.n_tokens, n_salient=20, shares=SHARES, checkpoints_per_mixture=3)
    groups = [str(g) for g in lad.groups]
    sv = fit_salience(lad.losses, lad.scores, groups=groups, probe=probe, task="t", n_folds=4)
    sv.fit_report["groups"] = groups  # as csv-callback fit records them for the report
    return sv


def test_cv_panels_keep_their_size_and_tell_36_groups_apart(vector):
    fig = _cv_figure(vector.fit_report)
    panels = fig.axes
    assert len(panels) == len(vector.fit_report["cv_pred"]) == 2  # csv and uniform: the probe has no answer tokens
    for ax in panels:  # each panel stays a readable square, not a strip squeezed by a legend
        bbox = ax.get_window_extent().transformed(fig.dpi_scale_trans.inverted())
        assert bbox.height > 2.5 and bbox.width > 2.5
        assert ax.get_legend() is None
    (legend,) = fig.legends
    assert len(legend.get_texts()) == 36 and legend._ncols > 1
    # Every group its own (colour, marker) pair.
    styles = {(tuple(np.round(c.get_facecolor()[0], 3)), c.get_paths()[0].vertices.tobytes())
              for c in panels[0].collections}
    assert len(styles) == 36


def test_report_marks_the_best_method_and_shades_salience_legibly(vector, probe, tokenizer, tmp_path):
    page = write_report(vector, tmp_path / "r", probe=probe, tokenizer=tokenizer).read_text()
    best = min(vector.fit_report["cv_mse"], key=vector.fit_report["cv_mse"].get)
    rows = re.findall(r"<tr><td>(\w+)</td><td>[^<]*</td><td>[^<]*</td>(<td[^>]*>[^<]*</td>)</tr>", page)
    assert [m for m, cell in rows if "best" in cell] == [best] and len(rows) == len(vector.fit_report["cv_mse"])
    alphas = [float(a) for a in re.findall(r"rgba\(192,57,43,([0-9.]+)\)", page)]
    # The darkest shade keeps the page's #222 text at 4.9:1 contrast (at full colour it would be 2.9:1).
    assert max(alphas) == pytest.approx(0.70)
    assert "Tokens are shown as [ids]" not in page


def test_report_says_why_the_probe_text_is_missing(vector, probe, tmp_path):
    page = write_report(vector, tmp_path / "r").read_text()
    assert "Not shown: this report was written without the vector's probe" in page and "--probe" in page
    page = write_report(vector, tmp_path / "ids", probe=probe).read_text()
    assert "Tokens are shown as [ids]: pass the probe's tokenizer" in page
