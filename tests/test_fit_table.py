"""fit_from_table: domain vectors from a CSV of per-domain losses and scores (a W&B history export, a results
sheet)."""

import csv
import re

import numpy as np
import pytest
from test_domain_vectors import DOMAINS, domain_table

from csv_callback import fit_salience
from csv_callback.fit_table import fit_from_table


def write_table(path, X, y, groups, blank=(), extra_columns=True):
    header = ["step", *(f"loss/{d}" for d in DOMAINS), "icl/syn", "corpus"] + (["lr"] if extra_columns else [])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, (row, score, g) in enumerate(zip(X, y, groups)):
            cells = [i, *(repr(float(v)) for v in row), repr(float(score)), g] + (["0.001"] if extra_columns else [])
            if i in blank:
                cells[2] = ""  # loss/code not logged at this step
            w.writerow(cells)
    return path


def test_fits_the_same_vector_as_fit_salience_on_the_same_numbers(tmp_path):
    X, y, groups = domain_table()
    path = write_table(tmp_path / "t.csv", X, y, groups)
    sv = fit_from_table(path, "syn", "loss/*", "icl/syn", groups="col:corpus")
    direct = fit_salience(X, y, groups=groups, domains=DOMAINS, task="syn")
    assert sv.domains == tuple(DOMAINS)
    np.testing.assert_array_equal(sv.weights, direct.weights)
    assert sv.fit_report["cv_mse"] == direct.fit_report["cv_mse"]
    assert sv.fit_report["table_rows"] == list(range(2, 2 + len(y)))


def test_rows_without_every_value_are_left_out_with_a_warning(tmp_path):
    X, y, groups = domain_table()
    path = write_table(tmp_path / "t.csv", X, y, groups, blank=(0, 5))
    with pytest.warns(UserWarning, match=r"2 of 36 row\(s\) lack a loss or the score"):
        sv = fit_from_table(path, "syn", "loss/*", "icl/syn", groups="col:corpus")
    assert sv.fit_report["n_checkpoints"] == 34 and 2 not in sv.fit_report["table_rows"]


def test_patterns_order_the_domains_and_name_them(tmp_path):
    X, y, groups = domain_table()
    path = write_table(tmp_path / "t.csv", X, y, groups)
    sv = fit_from_table(path, "syn", ["loss/wiki", "loss/c*"], "icl/syn", groups="col:corpus")
    # A pattern without one '*' keeps the whole column name; 'loss/c*' matches c4 and code, in header order.
    assert sv.domains == ("loss/wiki", "4", "ode")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_columns": "val/*"}, r"'val/\*' matches no column"),
        ({"loss_columns": ["loss/*", "loss/c4"]}, "more than one pattern"),
        ({"loss_columns": []}, "one or more column patterns"),
        ({"score_column": "icl/other"}, r"missing column\(s\) \['icl/other'\]"),
        ({"groups": "re:corpus"}, "must be 'col:NAME'"),
        ({"groups": "col:run"}, r"missing column\(s\) \['run'\]"),
        ({"n_fold": 3}, "unknown option"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    X, y, groups = domain_table()
    path = write_table(tmp_path / "t.csv", X, y, groups)
    args = {"loss_columns": "loss/*", "score_column": "icl/syn", "groups": "col:corpus", **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        fit_from_table(path, "syn", **args)


def test_a_cell_that_is_not_a_number_names_its_line(tmp_path):
    X, y, groups = domain_table()
    path = write_table(tmp_path / "t.csv", X, y, groups)
    text = path.read_text().splitlines()
    cells = text[3].split(",")
    cells[1] = "high"
    text[3] = ",".join(cells)
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"line 4: loss/c4='high' is not a number"):
        fit_from_table(path, "syn", "loss/*", "icl/syn", groups="col:corpus")


def test_cli_fits_a_domain_vector_from_a_table(tmp_path, capsys):
    from csv_callback import SalienceVector
    from csv_callback.cli import main

    X, y, groups = domain_table()
    path = write_table(tmp_path / "t.csv", X, y, groups, blank=(3,))
    out = tmp_path / "syn.safetensors"
    assert main(["fit", str(path), "--loss-columns", "loss/*", "--task", "syn", "--score-column", "icl/syn",
                 "--groups", "col:corpus", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "note: " in printed.err and "1 of 36 row(s)" in printed.err
    assert f"domain vector over 4 domains {DOMAINS}" in printed.out and "best single domain code" in printed.out
    assert [line.split()[0] for line in printed.out.splitlines()[-3:]] == ["csv", "uniform", "domain"]
    sv = SalienceVector.load(out)
    assert sv.domains == tuple(DOMAINS) and sv.fit_report["n_checkpoints"] == 35


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--scores", "s.csv"], r"\['--scores'\] belong to fitting from loss stores"),
        (["--trajectory-prior"], r"\['--trajectory-prior'\] belong"),
        (["--filter", "x"], r"\['--filter'\] belong"),
    ],
)
def test_cli_table_mode_refuses_store_options(tmp_path, capsys, extra, match):
    from csv_callback.cli import main

    X, y, groups = domain_table()
    path = write_table(tmp_path / "t.csv", X, y, groups)
    assert main(["fit", str(path), "--loss-columns", "loss/*", "--task", "syn", "--score-column", "icl/syn",
                 "--out", str(tmp_path / "o.safetensors"), *extra]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_fit_without_scores_or_table_says_what_is_missing(tmp_path, capsys):
    from csv_callback.cli import main

    assert main(["fit", str(tmp_path), "--task", "syn", "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "--lmeval PATH... or --scores CSV (or --loss-columns" in capsys.readouterr().err


def test_report_of_a_domain_vector_shows_its_domains_and_the_best_single_domain(tmp_path):
    from csv_callback.cli import main

    X, y, groups = domain_table()
    path = write_table(tmp_path / "t.csv", X, y, groups)
    vec = tmp_path / "syn.safetensors"
    assert main(["fit", str(path), "--loss-columns", "loss/*", "--task", "syn", "--score-column", "icl/syn",
                 "--groups", "col:corpus", "--out", str(vec)]) == 0
    assert main(["report", str(vec), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Weight of each validation domain" in page and "c4, code, wiki, books" in page
    assert "<td>domain</td>" in page and "best single domain" in page
    assert "Probe text by salience" not in page  # a domain vector has no probe text
    assert (tmp_path / "rep" / "weights.png").stat().st_size > 5_000
