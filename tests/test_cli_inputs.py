"""Crafted and unusual inputs to `fit` and `predict`: every one gives an answer or an error naming it, never a
traceback or a hang. Real loss stores, real results files, FIFOs and pipes, the real console script."""

import csv
import json
import os
import subprocess

import numpy as np
import pytest
from offline_helpers import subprocess_env
from test_cli import run_cli

from csv_callback import ProbeSet, SalienceVector
from csv_callback.cli import main
from csv_callback.lmeval import ScoresError, scores_from_lmeval
from csv_callback.store import LossStore, load_losses

STEPS = (10, 20, 40, 80, 160, 320)


@pytest.fixture(scope="module")
def probe(tokenizer, corpus) -> ProbeSet:
    return ProbeSet.from_texts([t[:300] for t in corpus[:4]], tokenizer, max_length=48)


def write_run(run_dir, probe: ProbeSet, seed: int, extra=None) -> list[str]:
    """A run as a training callback leaves it: ``<run>/losses`` (checkpoints named ``step-...``, losses falling
    with the step) and ``<run>/lmeval/<name>/results_<name>.json`` recording ``model_name`` ``step-...``, whose
    accuracy follows the loss. Returns the checkpoint names."""
    rng = np.random.default_rng(seed)
    store = LossStore(run_dir / "losses", probe)
    base = rng.uniform(2.0, 6.0, probe.n_tokens)
    names = []
    for step in STEPS:
        name = f"step-{step:09d}"
        losses = (base * (1.0 + 3.0 / np.log(step)) + rng.normal(0, 0.05, probe.n_tokens)).astype(np.float32)
        store.write(name, losses, step=step, extra=extra)
        acc = 0.25 + 0.7 / (1.0 + np.exp(float(losses.mean()) - 7.0))
        results = run_dir / "lmeval" / name / f"results_{name}.json"
        results.parent.mkdir(parents=True)
        results.write_text(json.dumps({"results": {"t": {"acc,none": acc}}, "model_name": name,
                                       "config": {"model_args": {"pretrained": name}}}))
        names.append(name)
    return names


@pytest.fixture(scope="module")
def runs(tmp_path_factory, probe):
    root = tmp_path_factory.mktemp("runs")
    for seed, run in enumerate(("mixA-s1", "mixA-s2", "mixB-s1", "mixB-s2")):
        write_run(root / run, probe, seed)
    return root


def results_file(path, doc_text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc_text)
    return path


# ---------------------------------------------------------------------- lm-eval results
def test_runs_whose_results_all_record_step_names_are_matched_by_run_directory(runs, tmp_path, capsys):
    stores = sorted(str(p) for p in runs.glob("*/losses"))
    results = sorted(str(p) for p in runs.glob("*/lmeval"))
    vec = tmp_path / "t.safetensors"
    assert (
        main(["fit", *stores, "--task", "t", "--lmeval", *results, "--groups", r"re:^(mix\w)-", "--out", str(vec)]) == 0
    )
    rep = SalienceVector.load(vec).fit_report
    assert len(rep["checkpoints"]) == 4 * len(STEPS)
    # Each score is the one in that run's own results file, not another run's of the same step.
    for name, score, source in zip(rep["checkpoints"], rep["scores"], rep["score_sources"]):
        run, _, step = name.split("/")
        want = runs / run / "lmeval" / step / f"results_{step}.json"
        assert source == str(want) and score == json.loads(want.read_text())["results"]["t"]["acc,none"]
    capsys.readouterr()
    # A results tree outside every run directory cannot be told apart: named, not guessed.
    outside = tmp_path / "elsewhere"
    results_file(
        outside / "results_1.json", (runs / "mixA-s1/lmeval/step-000000010/results_step-000000010.json").read_text()
    )
    assert main(["fit", *stores, "--task", "t", "--lmeval", str(outside), "--out", str(tmp_path / "w")]) == 2
    assert "matches no collected checkpoint (by path, by name, or by name in a loss store of the run directory" in \
        capsys.readouterr().err
    # Two stores in one run directory hold 'step-000000010': ambiguous, so an error, not a coin toss.
    table = load_losses(stores[:1])
    with pytest.raises(ScoresError, match="could be checkpoint 'a/step-000000010' or 'b/step-000000010'"):
        scores_from_lmeval([runs / "mixA-s1" / "lmeval"], "t", ["a/step-000000010", "b/step-000000010"],
                           checkpoint_stores=[(runs / "mixA-s1" / "a", table.names[0]),
                                              (runs / "mixA-s1" / "b", table.names[0])])


def test_crafted_results_values_are_named(runs, tmp_path):
    names = [f"step-{s:09d}" for s in STEPS]
    for body, message in [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"results": {"t": {"acc,none": 1' + "0" * 400 + '}}, "model_name": "step-000000010"}',
         r"t acc,none is 1000.*, not a finite number"),
        ('{"results": {"t": {"acc,none": 1' + "0" * 5000 + '}}, "model_name": "step-000000010"}',
         "not a readable JSON file .*integer string conversion"),
    ]:
        f = results_file(tmp_path / "r" / "results_x.json", body)
        with pytest.raises(ScoresError, match=f"{f}: .*{message}"):
            scores_from_lmeval([f], "t", names)


def test_results_that_are_not_regular_files_are_refused_without_blocking(runs, probe, tmp_path):
    """A FIFO named results_*.json (or a symlink to one) would block a read forever: fit names it instead."""
    run = tmp_path / "run"
    write_run(run, probe, seed=7)
    fifo = run / "lmeval" / "results_fifo.json"
    os.mkfifo(fifo)
    link = tmp_path / "results_link.json"
    link.symlink_to(fifo)
    for lmeval in (run / "lmeval", link):
        out = run_cli("fit", str(run / "losses"), "--task", "t", "--lmeval", str(lmeval), "--out",
                      str(tmp_path / "v.safetensors"), timeout=90)
        assert out.returncode == 2, out.stderr
        assert f"{lmeval if lmeval == link else fifo} is not a regular file (a FIFO, socket or device)" in out.stderr
        assert "Traceback" not in out.stderr


def test_a_non_string_model_path_in_a_loss_file_is_named(probe, tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, probe, seed=3, extra={"path": 123})
    assert main(["fit", str(run / "losses"), "--task", "t", "--lmeval", str(run / "lmeval"), "--out",
                 str(tmp_path / "v")]) == 2
    assert "checkpoint 'step-000000010' records the model path 123, not a string" in capsys.readouterr().err


def test_scores_csv_with_a_byte_order_mark_is_read(runs, tmp_path, capsys):
    """Excel's 'CSV UTF-8' starts with a byte-order mark, which must not become part of the first column's name."""
    store = runs / "mixA-s1" / "losses"
    table = load_losses(store)
    scores = tmp_path / "scores.csv"
    with scores.open("w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "score"])
        w.writerows([n, 0.9 - 0.1 * i] for i, n in enumerate(table.names))
    assert scores.read_bytes().startswith(b"\xef\xbb\xbfcheckpoint,")
    assert main(["fit", str(store), "--task", "t", "--scores", str(scores), "--out", str(tmp_path / "v")]) == 0
    assert SalienceVector.load(tmp_path / "v").fit_report["scores"] == pytest.approx([0.9 - 0.1 * i for i in range(6)])


# ---------------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def two_vectors(runs, tmp_path_factory):
    """Two vectors of task t from different runs' scores, and a store with one far-off checkpoint."""
    root = tmp_path_factory.mktemp("vectors")
    paths = []
    for run in ("mixA-s1", "mixB-s2"):
        paths.append(root / run / "t.safetensors")
        assert main(["fit", str(runs / run / "losses"), "--task", "t", "--lmeval", str(runs / run / "lmeval"),
                     "--out", str(paths[-1])]) == 0
    store = LossStore(root / "store", ProbeSet.load(runs / "mixA-s1" / "losses" / "probe.safetensors"))
    fitted = load_losses(runs / "mixA-s1" / "losses")
    for i in range(2):
        store.write(fitted.names[i], fitted.losses[i], step=int(fitted.steps[i]))
    store.write("diverged", np.full(store.n_tokens, 30.0, np.float32), step=999)
    return root / "store", paths


def test_predict_names_vectors_of_one_task_apart_and_flags_extrapolation(two_vectors, capsys):
    store, (a, b) = two_vectors
    assert main(["predict", str(store), str(a), str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"t ({a})" in lines[0] and f"t ({b})" in lines[0] and lines[0].count("extrapolating") == 2
    row = {ln.split()[0]: ln.split()[2:] for ln in lines[1:4]}
    assert row["diverged"][1] == row["diverged"][3] == "yes"  # 30 nats per token: far outside the fitting range
    assert row["step-000000010"][1] == "no"
    assert lines[-1].startswith("extrapolating yes: the weighted loss is outside the range seen in fitting")
    assert main(["predict", str(store), str(a), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["checkpoint"]: r["extrapolating"] for r in records} == {"step-000000010": False, "step-000000020": False,
                                                                      "diverged": True}
    assert all(r["vector"] == str(a) and "extrapolated" not in r for r in records)
    assert main(["predict", str(store), str(a), str(a)]) == 2
    assert f"vector {a} is given twice" in capsys.readouterr().err


def test_predict_into_a_closed_pipe_exits_quietly(two_vectors):
    """`csv-callback predict ... --json | head -1`: the reader may go before the output is written."""
    store, (a, b) = two_vectors
    proc = subprocess.Popen(["csv-callback", "predict", str(store), str(a), str(b), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    proc.stdout.close()  # gone before the first line: its first write meets a pipe without a reader
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == ""
    # As a shell pipeline runs it.
    out = subprocess.run(f"set -o pipefail; csv-callback predict '{store}' '{a}' --json | head -1", shell=True,
                         executable="/bin/bash", capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert out.stdout == "[\n" and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr
