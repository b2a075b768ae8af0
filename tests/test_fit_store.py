"""fit_from_store: a vector from loss stores and scores (a CSV or lm-eval results files), as `csv-callback fit`
fits it, and the same fit as fit_salience on the stored matrix."""

import json

import numpy as np
import pytest

from csv_callback import ProbeSet, fit_salience
from csv_callback.fit_store import fit_from_store
from csv_callback.store import LossStore, load_losses
from csv_callback.testing import synthetic_ladder


@pytest.fixture
def runs(tmp_path, probe):
    """One loss store per data mixture (as one save_dir per run), a scores CSV naming the checkpoints
    ``<mixture>/step-<i>`` with a mixture column, and the synthetic ladder they hold."""
    lad = synthetic_ladder(n_tokens=probe.n_tokens, n_salient=3, checkpoints_per_mixture=4, seed=3)
    rows = ["checkpoint,score,mix"]
    for i, (losses, score, mix) in enumerate(zip(lad.losses, lad.scores, lad.groups)):
        LossStore(tmp_path / "runs" / mix, probe).write(f"step-{i}", losses, step=i)
        rows.append(f"{mix}/step-{i},{float(score)!r},{mix}")
    (tmp_path / "scores.csv").write_text("\n".join(rows) + "\n")
    return sorted((tmp_path / "runs").iterdir()), tmp_path / "scores.csv", lad


def test_fits_as_fit_salience_on_the_stored_matrix_and_names_each_checkpoint(runs):
    stores, csv, _ = runs
    sv = fit_from_store(stores, "t", scores=csv, groups="col:mix")
    table = load_losses(stores)
    by_name = {line.split(",")[0]: float(line.split(",")[1]) for line in csv.read_text().splitlines()[1:]}
    y = np.array([by_name[n] for n in table.names])
    direct = fit_salience(table.losses, y, groups=[n.split("/")[0] for n in table.names],
                          probe=LossStore(stores[0]).probe(), task="t")
    assert np.array_equal(sv.weights, direct.weights) and sv.link == direct.link
    rep = sv.fit_report
    assert rep["cv_pred"] == direct.fit_report["cv_pred"] and rep["scores"] == y.tolist()
    assert rep["checkpoints"] == table.names
    assert rep["score_sources"] == [f"{csv}:{line}" for line in
                                    (list(by_name).index(n) + 2 for n in table.names)]
    # What a report draws comes from fit_salience itself, not from keys fit_from_store adds.
    assert direct.fit_report["groups"] == rep["groups"] == [n.split("/")[0] for n in table.names]
    np.testing.assert_allclose(direct.fit_report["weighted_loss"], sv.weighted_loss(table.losses), rtol=1e-12)


def test_unscored_checkpoints_are_left_out_with_a_warning(runs, tmp_path):
    stores, csv, _ = runs
    lines = csv.read_text().splitlines()
    part = tmp_path / "part.csv"
    part.write_text("\n".join(lines[:1] + lines[1:10]) + "\n")  # 9 of the 16 checkpoints
    with pytest.warns(UserWarning, match="7 stored checkpoint\\(s\\) have no t score and are left out"):
        sv = fit_from_store(stores, "t", scores=part)
    assert sv.fit_report["n_checkpoints"] == 9 and sv.fit_report["cv"] == "random"
    assert sorted(sv.fit_report["checkpoints"]) == sorted(ln.split(",")[0] for ln in lines[1:10])


def test_scores_from_lm_eval_results_files_grouped_by_a_regex(runs, tmp_path):
    stores, csv, _ = runs
    out = tmp_path / "lm_eval_out"
    out.mkdir()
    for i, line in enumerate(csv.read_text().splitlines()[1:]):
        name, score, _ = line.split(",")
        doc = {"model_name": name, "results": {"t": {"acc,none": float(score), "acc_stderr,none": 0.01}}}
        (out / f"results_{i}.json").write_text(json.dumps(doc))
    sv = fit_from_store(stores, "t", lmeval=out, groups=r"re:^([^/]+)/")
    from_csv = fit_from_store(stores, "t", scores=csv, groups="col:mix")
    assert np.array_equal(sv.weights, from_csv.weights) and sv.fit_report["groups"] == from_csv.fit_report["groups"]
    assert all(src.startswith(str(out)) for src in sv.fit_report["score_sources"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "either as lm-eval results .* not neither"),
        ({"lmeval": "x", "scores": "y"}, "not both"),
        ({"mapping": "map.csv"}, "pass mapping only with lmeval"),
        ({"groups": "re:^nomatch"}, "groups 're:\\^nomatch' does not match checkpoint"),
        ({"groups": "re:("}, "bad regular expression"),
        ({"groups": "col:run"}, "the scores CSV has no column 'run'"),
        ({"groups": "mix"}, "groups must be 're:REGEX' or 'col:NAME', got 'mix'"),
        ({"groups": ["a", "b"]}, "groups must be 're:REGEX' or 'col:NAME'"),
        ({"task": ""}, "task must be a non-empty str"),
    ],
)
def test_bad_input(runs, kwargs, match):
    stores, csv, _ = runs
    kwargs = {"task": "t", **kwargs}
    if not {"lmeval", "scores"} & set(kwargs) and "neither" not in match:
        kwargs["scores"] = csv
    with pytest.raises(ValueError, match=match):
        fit_from_store(stores, **kwargs)


def test_stores_and_scores_that_do_not_fit_together(runs, tmp_path, tokenizer):
    stores, csv, _ = runs
    with pytest.raises(ValueError, match="is not a loss store"):
        fit_from_store([*stores, tmp_path], "t", scores=csv)
    with pytest.raises(ValueError, match="needs at least one loss store"):
        fit_from_store([], "t", scores=csv)
    extra = tmp_path / "extra.csv"
    extra.write_text(csv.read_text() + "elsewhere/step-0,0.5,x\n")
    with pytest.raises(ValueError, match=r"scores name checkpoint\(s\) \['elsewhere/step-0'\] that are not in"):
        fit_from_store(stores, "t", scores=extra)
    other = ProbeSet.from_texts(["Another probe altogether, of other tokens."], tokenizer, 16)
    LossStore(tmp_path / "other", other).write("step-0", np.ones(other.n_tokens, np.float32), step=0)
    with pytest.raises(ValueError, match=f"probe {other.fingerprint}"):
        fit_from_store([*stores, tmp_path / "other"], "t", scores=csv)
    with pytest.raises(ValueError, match="groups 'col:NAME' reads a column of the scores CSV"):
        fit_from_store(stores, "t", lmeval=tmp_path / "no_results_needed", groups="col:mix")


def test_an_unknown_fit_option_is_refused_before_any_file_is_read(tmp_path):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['folds'\]; it passes only \['n_folds', "):
        fit_from_store(tmp_path / "no-such-store", "t", scores=tmp_path / "no-such.csv", folds=3)
