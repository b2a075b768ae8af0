"""The ladder's fast in-process task scorer gives exactly lm-eval-harness's accuracy.

The ladder benchmark (benchmarks/ladder) scores its checkpoints on three multiple-choice tasks with
``world.TaskScorer`` instead of launching lm-eval for each. Here the real harness runs offline, through its
Hugging Face model wrapper, on the ladder's custom task YAMLs and on the checkpoint the ladder saved
(``benchmarks/ladder/data/model``), and both must agree on every question.

Needs the optional extra: ``pip install -e ".[lmeval]"``.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from offline_helpers import one_torch_thread

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's "hf" model backend

LADDER = Path(__file__).resolve().parents[1] / "benchmarks" / "ladder"
sys.path.insert(0, str(LADDER))

from world import TASKS, TaskScorer, World  # noqa: E402

MODEL = LADDER / "data" / "model"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(fast scorer's per-task log-likelihoods and accuracies, lm-eval's results with samples, questions)."""
    if not (MODEL / "config.json").is_file():
        pytest.fail(f"{MODEL} is missing: run `PYTHONPATH=. python benchmarks/ladder/train.py` to create it.")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with one_torch_thread():
        world = World()
        tokenizer = AutoTokenizer.from_pretrained(MODEL)
        task_dir = world.write_tasks(tmp_path_factory.mktemp("ladder_tasks"))
        scorer = TaskScorer(world, tokenizer=tokenizer)
        model = AutoModelForCausalLM.from_pretrained(MODEL)
        lls, accs = scorer.loglikelihoods(model), scorer(model)
        res = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={MODEL},tokenizer={MODEL}", tasks=list(TASKS), device="cpu",
            batch_size=64, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            log_samples=True,  # default bootstrap_iters: acc's stderr is lm-eval's closed form, no resampling
        )
    return world, tokenizer, scorer, lls, accs, res


def test_world_rebuilds_the_saved_tokenizer(runs):
    world, tokenizer, *_ = runs
    # The committed data were made with this code: the world trains the same tokenizer again.
    assert tokenizer.get_vocab() == world.tokenizer.get_vocab()


@pytest.mark.parametrize("task", TASKS)
def test_fast_scorer_matches_lm_eval(runs, task):
    _world, _tokenizer, scorer, lls, accs, res = runs
    assert accs[task]["acc"] == res["results"][task]["acc,none"]
    assert accs[task]["acc_stderr"] == pytest.approx(res["results"][task]["acc_stderr,none"], rel=1e-12)
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == scorer.docs[task]
    theirs = np.array([[ll for ll, _ in s["filtered_resps"]] for s in samples])
    np.testing.assert_allclose(lls[task], theirs, rtol=0, atol=1e-4)
    # Same winning choice on every question, not just the same count of right answers.
    assert (lls[task].argmax(1) == theirs.argmax(1)).all()


def test_saved_results_file_is_the_fast_scorers(runs):
    """The results JSON the ladder wrote for the saved checkpoint holds the accuracies scored here."""
    *_, accs, _ = runs
    model_step = json.loads((MODEL / "ladder.json").read_text())
    doc = json.loads((LADDER / "data" / model_step["results"]).read_text())
    assert {t: doc["results"][t]["acc,none"] for t in TASKS} == {t: a["acc"] for t, a in accs.items()}
    assert {t: doc["results"][t]["acc_stderr,none"] for t in TASKS} == {t: a["acc_stderr"] for t, a in accs.items()}
