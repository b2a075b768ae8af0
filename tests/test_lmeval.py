"""Scores from real lm-eval-harness results files: run the harness offline on a local task, then fit from them.

Needs the optional extra: ``pip install -e ".[lmeval]"`` (lm-eval with its Hugging Face backend).
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from offline_helpers import arithmetic_items, one_torch_thread, subprocess_env, train_ladder, write_jsonl

from csv_callback import SalienceVector
from csv_callback.cli import main
from csv_callback.lmeval import (
    ScoresError,
    read_score,
    recorded_model,
    scores_from_csv,
    scores_from_lmeval,
    write_multiple_choice_task,
)
from csv_callback.store import load_losses

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's "hf" model backend

TASK = "arith_mc"
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def harness(tmp_path_factory, tokenizer):
    """Checkpoints of two runs, their lm-eval results (in-process API and, for one, the real CLI), a store."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lmeval")
    items = arithmetic_items()
    task_dir = write_multiple_choice_task(root / "task", TASK, items).parent
    texts = [it["question"] + it["choices"][0] for it in items]
    ckpts = train_ladder(root / "runA", tokenizer, texts, (0, 12), seed=0) + \
        train_ladder(root / "runB", tokenizer, texts, (0, 12), seed=1, lr=1e-3)
    out = root / "lm_eval_out"
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)  # skip indexing ~10k built-in tasks
    for d in ckpts[1:]:
        # What `lm-eval run --output_path` does: simple_evaluate, then the tracker writes results_<date>.json.
        tracker = EvaluationTracker(output_path=str(out))
        res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={d},tokenizer={d}", tasks=[TASK],
                                      device="cpu", batch_size=16, task_manager=manager, evaluation_tracker=tracker,
                                      bootstrap_iters=0)
        tracker.save_results_aggregated(results=res, samples=None)
    # The first checkpoint through the real console script (it records model_args as a dict, the API as a string).
    cli = subprocess.run(["lm-eval", "run", "--model", "hf", "--model_args", f"pretrained={ckpts[0]}",
                          f"tokenizer={ckpts[0]}", "--tasks", TASK, "--include_path", str(task_dir), "--output_path",
                          str(out), "--device", "cpu", "--batch_size", "16"],
                         capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert cli.returncode == 0, cli.stderr[-2000:]
    files = sorted(out.rglob("results_*.json"))
    assert len(files) == len(ckpts)
    probe_in = write_jsonl(root / "pairs.jsonl", [{"context": it["question"], "continuation": it["choices"][0]}
                                                  for it in items])
    tokenizer.save_pretrained(root / "tok")
    assert (
        main(["probe", str(probe_in), "--tokenizer", str(root / "tok"), "--out", str(root / "probe.safetensors")]) == 0
    )
    assert main(["collect", *map(str, ckpts), "--probe", str(root / "probe.safetensors"), "--out", str(root / "store"),
                 "--name-parts", "2", "--no-progress"]) == 0
    return root, ckpts, files


def test_results_files_are_read_as_lm_eval_writes_them(harness):
    _root, ckpts, files = harness
    docs = [json.loads(f.read_text()) for f in files]
    assert sorted(recorded_model(d) for d in docs) == sorted(str(c) for c in ckpts)
    assert {type(d["config"]["model_args"]) for d in docs} == {str, dict}  # both of lm-eval's spellings occur
    for d in docs:
        assert read_score(d, TASK) == d["results"][TASK]["acc,none"]
    # Without model_name (older lm-eval) the path comes from config.model_args.
    for d in docs:
        assert recorded_model({"config": d["config"]}) == recorded_model(d)


def test_fit_from_lm_eval_results(harness, tmp_path, capsys):
    root, _ckpts, files = harness
    vec = tmp_path / "arith.safetensors"
    assert main(["fit", str(root / "store"), "--task", TASK, "--lmeval", str(root / "lm_eval_out"),
                 "--groups", r"re:^(run\w)/", "--out", str(vec)]) == 0
    out = capsys.readouterr().out
    assert all(any(ln.startswith(m) for ln in out.splitlines()) for m in ("csv", "uniform", "label"))
    rep = SalienceVector.load(vec).fit_report
    # Every checkpoint got exactly the score lm-eval wrote for it.
    want = {}
    for f in files:
        d = json.loads(f.read_text())
        want[f"{Path(d['model_name']).parent.name}/{Path(d['model_name']).name}"] = d["results"][TASK]["acc,none"]
    assert dict(zip(rep["checkpoints"], rep["scores"])) == want
    assert sorted(set(rep["groups"])) == ["runA", "runB"]


def test_mapping_file_assigns_results_to_store_names(harness, tmp_path, capsys):
    root, ckpts, _files = harness
    table = load_losses(root / "store")
    mapping = tmp_path / "map.csv"
    mapping.write_text("model,checkpoint\n" + "".join(f"{c},{c.parent.name}/{c.name}\n" for c in ckpts))
    got = scores_from_lmeval([root / "lm_eval_out"], TASK, table.names, mapping=_read(mapping))
    assert len(got) == len(ckpts)
    # A model missing from the mapping is named.
    mapping.write_text("model,checkpoint\n" + "".join(f"{c},{c.parent.name}/{c.name}\n" for c in ckpts[1:]))
    assert main(["fit", str(root / "store"), "--task", TASK, "--lmeval", str(root / "lm_eval_out"), "--mapping",
                 str(mapping), "--out", str(tmp_path / "v")]) == 2
    assert f"{ckpts[0]}' is not in the mapping file" in capsys.readouterr().err


def _read(path):
    from csv_callback.lmeval import read_mapping

    return read_mapping(path)


def test_bad_results_input_is_named(harness, tmp_path, capsys):
    root, _ckpts, files = harness
    table = load_losses(root / "store")
    paths = [e["path"] for e in table.extra]
    with pytest.raises(ScoresError, match=r"no task 'hellaswag'; the file has tasks \['arith_mc'\]"):
        scores_from_lmeval([files[0]], "hellaswag", table.names, paths)
    with pytest.raises(ScoresError, match=r"no results file has task 'hellaswag'.*\['arith_mc'\]"):
        scores_from_lmeval([root / "lm_eval_out"], "hellaswag", table.names, paths)
    with pytest.raises(ScoresError, match=r"has no 'f1,none'; it has \['acc,none'\]"):
        scores_from_lmeval([files[0]], TASK, table.names, paths, metric="f1")
    # The same checkpoint scored by two files (a re-run left behind).
    dup = tmp_path / "dup"
    shutil.copytree(root / "lm_eval_out", dup)
    f = next(dup.rglob("results_*.json"))
    shutil.copy(f, f.with_name("results_2099-01-01T00-00-00.json"))
    with pytest.raises(ScoresError, match="is scored twice"):
        scores_from_lmeval([dup], TASK, table.names, paths)
    # A model that is not in the store.
    with pytest.raises(ScoresError, match="matches no collected checkpoint"):
        scores_from_lmeval([files[0]], TASK, ["other"], [None])
    assert main(["fit", str(root / "store"), "--task", "hellaswag", "--lmeval", str(root / "lm_eval_out"),
                 "--out", str(tmp_path / "v")]) == 2
    assert "no results file has task 'hellaswag'" in capsys.readouterr().err and not (tmp_path / "v").exists()


def test_multiple_choice_task_rejects_bad_docs_and_writes_nothing(tmp_path):
    root = tmp_path / "task"
    good = {"question": "What is 1 plus 1? Answer:", "choices": [" 2", " 3"], "answer": 0}
    for task, docs, match in [
        ("t", [], "docs is empty"),
        ("t", [{"q": 1}], r"docs\[0\] must be a mapping with keys \['question', 'choices', 'answer'\], got \['q'\]"),
        ("t", [good, {**good, "answer": 5}], r"docs\[1\]\['answer'\] must be the index \(0 to 1\)"),
        ("t", [{**good, "answer": True}], r"docs\[0\]\['answer'\] must be the index"),
        ("t", [{**good, "choices": [" 2"]}], r"docs\[0\]\['choices'\] must be a list of at least 2 strings"),
        ("a/b", [good], r"task name 'a/b' must be letters"),
    ]:
        with pytest.raises(ValueError, match=match):
            write_multiple_choice_task(root, task, docs)
    assert not root.exists()


def test_malformed_results_and_score_files_are_named(tmp_path):
    # results[task] must map metrics to finite numbers; a bool is no score.
    with pytest.raises(ScoresError, match=r"results\['t'\] is 0.5, not an object of metrics"):
        read_score({"results": {"t": 0.5}}, "t")
    for value in (True, float("inf"), "0.5"):
        with pytest.raises(ScoresError, match=r"t acc,none is .*, not a finite number"):
            read_score({"results": {"t": {"acc,none": value}}}, "t")
    assert recorded_model({"config": "not a mapping"}) is None
    results = tmp_path / "out" / "results_1.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"results": {"t": 0.5}, "model_name": "runA/step0"}))
    with pytest.raises(ScoresError, match=re.escape(f"{results}: results['t'] is 0.5")):
        scores_from_lmeval([tmp_path / "out"], "t", ["runA/step0"])
    # A ragged or non-finite row of a scores CSV is named by file and line.
    for body, match in [
        ("runA/step0,0.5,extra\n", "line 2: more fields than the header"),
        ("runA/step0,0.5\nrunA/step3\n", "line 3: fewer fields than the header"),
        ("runA/step0,nan\n", r"line 2: score='nan' is not a finite number"),
    ]:
        scores = tmp_path / "scores.csv"
        scores.write_text("checkpoint,score\n" + body)
        with pytest.raises(ScoresError, match=f"{re.escape(str(scores))}, {match}"):
            scores_from_csv(scores)
