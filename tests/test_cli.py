"""The csv-callback console script end to end, on real checkpoints (HF directories and Lightning .ckpt files)."""

import csv
import json
import re
import shutil
import signal
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from offline_helpers import arithmetic_items, one_torch_thread, subprocess_env, train_ladder, write_jsonl
from transformers import AutoModelForCausalLM

from csv_callback import ProbeSet, SalienceVector, token_losses
from csv_callback.cli import main
from csv_callback.store import LossStore, load_losses
from csv_callback.testing import tiny_gpt2, train_tokenizer

ITEMS = arithmetic_items()
TEXTS = [it["question"] + it["choices"][0] for it in ITEMS]


def plain_texts(corpus: list[str]) -> list[str]:
    """Two pydoc passages with whitespace collapsed, so each is one paragraph of a text file."""
    return [" ".join(corpus[5][:600].split()), " ".join(corpus[9][:600].split())]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory, tokenizer, corpus):
    """Two short training runs saved at 4 steps each, a tokenizer directory and probe input files."""
    root = tmp_path_factory.mktemp("cli")
    runs = {r: train_ladder(root / r, tokenizer, TEXTS, (0, 3, 8, 20), seed=s, lr=lr)
            for r, s, lr in (("runA", 0, 3e-3), ("runB", 1, 1e-3))}
    tokenizer.save_pretrained(root / "tok")
    write_jsonl(root / "pairs.jsonl", [{"context": it["question"], "continuation": it["choices"][0]} for it in ITEMS])
    (root / "text.txt").write_text("\n\n".join(plain_texts(corpus)) + "\n")
    return root, runs


@pytest.fixture(scope="module")
def probe_file(work):
    root, _ = work
    assert main(["probe", str(root / "pairs.jsonl"), str(root / "text.txt"), "--tokenizer", str(root / "tok"),
                 "--out", str(root / "probe.safetensors"), "--max-length", "64"]) == 0
    return root / "probe.safetensors"


@pytest.fixture(scope="module")
def store(work, probe_file):
    root, runs = work
    ckpts = [str(d) for r in runs.values() for d in r]
    assert main(["collect", *ckpts, "--probe", str(probe_file), "--out", str(root / "store"), "--name-parts", "2",
                 "--no-progress"]) == 0
    return root / "store"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed console script in a fresh process, as a user runs it."""
    return subprocess.run(
        ["csv-callback", *args], capture_output=True, text=True, timeout=timeout, env=subprocess_env()
    )


# ---------------------------------------------------------------------- help and probe
def test_console_script_has_help_for_every_subcommand(capsys):
    out = run_cli("--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("probe", "collect", "fit", "predict", "report"))
    for cmd in ("probe", "collect", "fit", "predict", "report"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert f"usage: csv-callback {cmd}" in capsys.readouterr().out


def test_probe_from_pairs_and_text_matches_the_api(work, probe_file, tokenizer, corpus, capsys):
    _root, _ = work
    probe = ProbeSet.load(probe_file)
    want = ProbeSet.concat([
        ProbeSet.from_pairs([(it["question"], it["choices"][0]) for it in ITEMS], tokenizer, max_length=64),
        ProbeSet.from_texts(plain_texts(corpus), tokenizer, max_length=64),
    ])
    assert probe.fingerprint == want.fingerprint
    assert 0 < int(probe.answer_mask.sum()) < probe.n_tokens


def test_probe_from_jsonl_texts_and_bad_inputs(work, tmp_path, capsys):
    root, _ = work
    write_jsonl(tmp_path / "t.jsonl", [{"body": "first probe text here"}, {"body": "second probe text"}])
    assert main(["probe", str(tmp_path / "t.jsonl"), "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "p"),
                 "--text-field", "body"]) == 0
    assert "fingerprint" in capsys.readouterr().out
    # No overwrite without --force; a missing text field and mixed pairs/texts are named.
    assert main(["probe", str(tmp_path / "t.jsonl"), "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "p"),
                 "--text-field", "body"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (
        main(["probe", str(tmp_path / "t.jsonl"), "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "q")]) == 2
    )
    assert "no string field 'text'" in capsys.readouterr().err
    write_jsonl(tmp_path / "m.jsonl", [{"text": "a b c d"}, {"context": "x", "continuation": " y"}])
    assert (
        main(["probe", str(tmp_path / "m.jsonl"), "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "r")]) == 2
    )
    assert "mixes pairs and texts" in capsys.readouterr().err
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- collect
def test_collect_stores_exact_losses_of_each_checkpoint(work, probe_file, store):
    _root, runs = work
    probe = ProbeSet.load(probe_file)
    table = load_losses(store, probe.fingerprint)
    assert sorted(table.names) == sorted(f"{r}/step{s}" for r in runs for s in (0, 3, 8, 20))
    assert sorted(set(table.steps.tolist())) == [0, 3, 8, 20]
    for d in (runs["runA"][2], runs["runB"][3]):
        row = table.names.index(f"{d.parent.name}/{d.name}")
        want = token_losses(AutoModelForCausalLM.from_pretrained(d), probe)
        np.testing.assert_allclose(table.losses[row], want.numpy(), atol=1e-6)
        assert table.extra[row]["path"] == str(d.resolve())
    # Training moved the losses: the checkpoints are really different.
    assert table.losses.std(axis=0).mean() > 0.01


def test_collect_resumes_and_only_computes_new_checkpoints(work, probe_file, tmp_path, capsys):
    _root, runs = work
    out = tmp_path / "store"
    first = [str(d) for d in runs["runA"][:2]]
    assert main(["collect", *first, "--probe", str(probe_file), "--out", str(out), "--no-progress"]) == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "losses").iterdir()}
    capsys.readouterr()
    # Re-run with more checkpoints and no --probe: the store's probe is used, done ones are skipped.
    assert main(["collect", *[str(d) for d in runs["runA"]], "--out", str(out), "--no-progress"]) == 0
    assert "collected 2 checkpoint(s), skipped 2 already stored" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "losses").iterdir() if p.name in mtimes} == mtimes
    assert len(load_losses(out).names) == 4
    # runB/step0 would also be named "step0": not silently skipped as if it were runA's.
    assert main(["collect", str(runs["runB"][0]), "--out", str(out), "--no-progress"]) == 2
    assert "already holds a checkpoint named 'step0'" in capsys.readouterr().err


def test_collect_bf16_keeps_float32_losses_close_to_float32_run(work, probe_file, store, tmp_path):
    _root, runs = work
    d = runs["runA"][3]
    assert main(["collect", str(d), "--probe", str(probe_file), "--out", str(tmp_path / "bf16"), "--bf16",
                 "--device", "cpu", "--no-progress"]) == 0
    got, ref = load_losses(tmp_path / "bf16"), load_losses(store)
    assert got.losses.dtype == np.float32 and got.extra[0]["dtype"] == "torch.bfloat16"
    want = ref.losses[ref.names.index("runA/step20")]
    assert not np.array_equal(got.losses[0], want)  # really computed in bf16 ...
    np.testing.assert_allclose(got.losses[0].mean(), want.mean(), rtol=2e-2)  # ... and close to float32


def test_interrupted_collect_leaves_complete_files_and_resumes(work, tokenizer, corpus, tmp_path):
    _root, runs = work
    # A probe of several hundred tokens: each checkpoint takes a moment, so the interrupt lands mid-run.
    ProbeSet.from_texts([t[:300] for t in corpus[:12]], tokenizer, max_length=128).save(tmp_path / "big.safetensors")
    ckpts = [str(d) for r in runs.values() for d in r]
    out = tmp_path / "store"
    # A shell starts a background job (`nohup ... &`, as a CI runner may) with SIGINT ignored, and a child inherits
    # an ignored signal but not a handler (exec resets it to the default): so handle it around the start, or the
    # interrupt below would be ignored and collect would run to the end.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(["csv-callback", "collect", *ckpts, "--probe", str(tmp_path / "big.safetensors"),
                                 "--out", str(out), "--name-parts", "2", "--no-progress"], stderr=subprocess.PIPE,
                                text=True, env=subprocess_env())
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "losses").glob("*.safetensors")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "re-run the same command" in err
    done = sorted(p.name for p in (out / "losses").iterdir())
    assert 1 <= len(done) < len(ckpts) and all(n.endswith(".safetensors") and not n.startswith(".") for n in done)
    load_losses(out)  # every file left behind is complete
    assert main(["collect", *ckpts, "--out", str(out), "--name-parts", "2", "--no-progress"]) == 0
    assert len(load_losses(out).names) == len(ckpts)


def test_collect_bad_input_fails_before_writing(work, probe_file, tmp_path, corpus, capsys):
    _root, runs = work
    a0 = str(runs["runA"][0])
    out = tmp_path / "store"

    def fails(*ckpts: str, extra=()) -> str:
        assert main(["collect", *ckpts, "--probe", str(probe_file), "--out", str(out), "--no-progress", *extra]) == 2
        assert not out.exists()
        return capsys.readouterr().err

    assert "no such checkpoint" in fails(a0, str(tmp_path / "missing"))
    assert "given twice" in fails(a0, a0 + "/")
    assert "--name-parts 2" in fails(a0, str(runs["runB"][0]))
    (tmp_path / "empty").mkdir()
    assert "no config.json" in fails(str(tmp_path / "empty"))
    (tmp_path / "x.ckpt").touch()
    assert "--module" in fails(str(tmp_path / "x.ckpt"))
    # A checkpoint saved with another tokenizer does not match the probe.
    other = train_tokenizer(corpus[:50], vocab_size=300)
    tiny_gpt2(len(other)).save_pretrained(tmp_path / "alien")
    other.save_pretrained(tmp_path / "alien")
    err = fails(a0, str(tmp_path / "alien"))
    assert "alien" in err and "not the one this probe was built with" in err


def test_collect_refuses_names_that_share_a_store_file(work, probe_file, tmp_path, capsys):
    """'mix a/step0' and 'mix_a/step0' are two names but one store file: neither may overwrite the other."""
    _, runs = work
    a, b = tmp_path / "mix a" / "step0", tmp_path / "mix_a" / "step0"
    shutil.copytree(runs["runA"][0], a)
    shutil.copytree(runs["runB"][0], b)
    out = tmp_path / "store"
    args = ["--name-parts", "2", "--probe", str(probe_file), "--out", str(out), "--no-progress"]
    assert main(["collect", str(a), str(b), *args]) == 2
    assert "in the same file 'mix_a_step0.safetensors'" in capsys.readouterr().err and not out.exists()
    # Collected one at a time, the second is refused and the first stays as it was.
    assert main(["collect", str(a), *args]) == 0
    first = (out / "losses" / "mix_a_step0.safetensors").read_bytes()
    assert main(["collect", str(b), *args]) == 2
    assert "already holds checkpoint 'mix a/step0'" in capsys.readouterr().err
    assert (out / "losses" / "mix_a_step0.safetensors").read_bytes() == first
    assert load_losses(out).names == ["mix a/step0"]


def test_collect_unloadable_checkpoint_is_named_before_the_store_is_created(work, probe_file, tmp_path, capsys):
    _, runs = work
    good = runs["runA"][0]
    out = tmp_path / "store"

    def fails(ckpt: Path, *extra: str) -> str:
        assert main(["collect", str(ckpt), "--probe", str(probe_file), "--out", str(out), "--no-progress", *extra]) == 2
        assert not out.exists()
        err = capsys.readouterr().err
        assert str(ckpt) in err
        return err

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    (tmp_path / "no_weights").mkdir()
    shutil.copy(good / "config.json", tmp_path / "no_weights")
    assert "no weights (model.safetensors" in fails(tmp_path / "no_weights")
    weights = copy("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "SafetensorError" in fails(weights.parent)
    (copy("bad_config") / "config.json").write_text("{not json")
    assert "not a valid JSON file" in fails(tmp_path / "bad_config")
    (copy("bad_tokenizer") / "tokenizer.json").write_text("{not json")
    assert "cannot load a tokenizer" in fails(tmp_path / "bad_tokenizer")

    lightning = ["--module", "test_cli:TinyLM"]
    ckpt = tmp_path / "truncated.ckpt"
    torch.save({"pytorch-lightning_version": L.__version__, "state_dict": tiny_gpt2(32).state_dict()}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    assert "incomplete, truncated or corrupt" in fails(ckpt, *lightning)
    torch.save(tiny_gpt2(32).state_dict(), tmp_path / "bare_state_dict.ckpt")
    err = fails(tmp_path / "bare_state_dict.ckpt", *lightning)
    assert "not a Lightning checkpoint: it has no 'pytorch-lightning_version'" in err
    # Garbage bytes are corrupt, not "objects other than tensors": unpickling them fully is no fix.
    (tmp_path / "garbage.ckpt").write_bytes(b"garbage not a zip or pickle")
    err = fails(tmp_path / "garbage.ckpt", *lightning)
    assert "corrupt" in err and "--trust-checkpoints" not in err


def test_bad_paths_tokenizers_and_devices_fail_cleanly_before_writing(work, probe_file, tmp_path, capsys):
    root, runs = work
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    probe_args = [str(root / "text.txt"), "--tokenizer", str(root / "tok")]
    collect_args = [str(runs["runA"][0]), "--probe", str(probe_file), "--no-progress"]
    for args, message in [
        (["probe", *probe_args, "--out", str(tmp_path)], "is a directory; give a file path"),
        (["probe", *probe_args, "--out", str(a_file / "p.safetensors")], "is a file, so nothing can be created below"),
        (["collect", *collect_args, "--out", str(a_file)], "is a file; give a directory"),
        (["collect", *collect_args, "--out", str(a_file / "store")], "is a file, so nothing can be created below"),
        (
            ["collect", *collect_args, "--out", str(tmp_path / "store"), "--device", "nodevice"],
            "device 'nodevice' cannot",
        ),
        (["report", str(probe_file), "--out", str(a_file)], "is a file; give a directory"),
    ]:
        assert main(args) == 2
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["collect", *collect_args, "--out", str(tmp_path / "store"), "--device", "cuda"]) == 2
        assert "device 'cuda' cannot be used on this machine" in capsys.readouterr().err
    assert a_file.read_text() == "not a directory" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    # As a user sees it: one line naming the missing tokenizer directory, no traceback, no download attempt.
    out = run_cli("probe", str(root / "text.txt"), "--tokenizer", "nope_tok", "--out", str(tmp_path / "p"))
    assert out.returncode == 2 and "nope_tok: no such tokenizer directory" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "p").exists()


# ---------------------------------------------------------------------- Lightning .ckpt
class TinyLM(L.LightningModule):
    """A LightningModule around the tiny GPT-2; ``tag`` lets a test put a non-tensor object into the hparams."""

    def __init__(self, vocab_size: int, tag: object = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = tiny_gpt2(vocab_size)

    def forward(self, ids):
        return self.net(input_ids=ids).logits

    def training_step(self, batch, _):
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def lightning_ckpt(path: Path, tokenizer, tag=None) -> TinyLM:
    module = TinyLM(len(tokenizer), tag=tag)
    ids = tokenizer(TEXTS, return_tensors="pt", padding=True)["input_ids"]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(ids, batch_size=12))
    trainer.save_checkpoint(path)
    return module


def test_collect_lightning_checkpoints_weights_only(work, probe_file, tmp_path, tokenizer, capsys):
    ckpt = tmp_path / "epoch=0-step=2.ckpt"
    module = lightning_ckpt(ckpt, tokenizer)
    out = tmp_path / "store"
    assert main(["collect", str(ckpt), "--module", "test_cli:TinyLM", "--probe", str(probe_file), "--out", str(out),
                 "--no-progress"]) == 0
    table = load_losses(out)
    assert table.names == ["epoch=0-step=2"] and table.steps.tolist() == [2]
    np.testing.assert_allclose(table.losses[0], token_losses(module, ProbeSet.load(probe_file)).numpy(), atol=1e-6)


def test_untrusted_lightning_checkpoint_needs_explicit_trust(work, probe_file, tmp_path, tokenizer, capsys):
    ckpt = tmp_path / "obj.ckpt"
    lightning_ckpt(ckpt, tokenizer, tag=Fraction(1, 3))  # an object weights_only loading refuses
    args = ["collect", str(ckpt), "--module", "test_cli:TinyLM", "--probe", str(probe_file), "--out",
            str(tmp_path / "store"), "--no-progress"]
    assert main(args) == 2
    assert "--trust-checkpoints" in capsys.readouterr().err
    assert not list((tmp_path / "store" / "losses").glob("*"))
    assert main([*args, "--trust-checkpoints"]) == 0
    assert load_losses(tmp_path / "store").names == ["obj"]


# ---------------------------------------------------------------------- fit, predict, report
@pytest.fixture(scope="module")
def scores_csv(store, probe_file):
    """Scores that depend on the answer-token loss of each collected checkpoint, plus a run column."""
    probe = ProbeSet.load(probe_file)
    table = load_losses(store)
    ans = table.losses[:, probe.answer_mask.numpy()].mean(axis=1)
    score = 0.3 + 0.6 / (1 + np.exp(2.0 * (ans - np.median(ans))))
    path = store.parent / "scores.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "score", "run"])
        for name, s in zip(table.names, score):
            w.writerow([name, f"{s:.6f}", name.split("/")[0]])
    return path


def test_fit_from_csv_prints_cv_table_and_writes_vector(store, scores_csv, tmp_path, capsys):
    vec = tmp_path / "v.safetensors"
    assert main(["fit", str(store), "--task", "arith", "--scores", str(scores_csv), "--groups", "col:run",
                 "--out", str(vec)]) == 0
    out = capsys.readouterr().out
    sv = SalienceVector.load(vec)
    rep = sv.fit_report
    assert rep["cv"] == "groups" and sorted(set(rep["groups"])) == ["runA", "runB"]
    for method in ("csv", "uniform", "label"):
        line = next(ln for ln in out.splitlines() if ln.startswith(method))
        assert float(line.split()[1]) == pytest.approx(rep["cv_mse"][method], rel=1e-2)
        assert float(line.split()[2]) == pytest.approx(rep["cv_mae"][method], rel=1e-2)
    assert len(rep["checkpoints"]) == 8 and len(rep["weighted_loss"]) == 8
    with scores_csv.open() as f:
        want = {r["checkpoint"]: float(r["score"]) for r in csv.DictReader(f)}
    assert rep["scores"] == pytest.approx([want[n] for n in rep["checkpoints"]])
    # The same groups from a regex on the checkpoint name give the same folds.
    assert main(["fit", str(store), "--task", "arith", "--scores", str(scores_csv), "--groups", r"re:^(run\w)/",
                 "--out", str(tmp_path / "w.safetensors")]) == 0
    assert SalienceVector.load(tmp_path / "w.safetensors").fit_report["folds"] == rep["folds"]
    # The probe has answer tokens, so both priors were cross-validated; --priors narrows the choice.
    assert set(rep["cv_mse_path"]) == {"uniform", "answer"} and f"prior {rep['prior']}," in out
    assert main(["fit", str(store), "--task", "arith", "--scores", str(scores_csv), "--groups", "col:run",
                 "--priors", "uniform", "--out", str(tmp_path / "u.safetensors")]) == 0
    assert set(SalienceVector.load(tmp_path / "u.safetensors").fit_report["cv_mse_path"]) == {"uniform"}
    assert rep["anchor"] is None
    assert main(["fit", str(store), "--task", "arith", "--scores", str(scores_csv), "--groups", "col:run",
                 "--anchor", "0", "1", "--out", str(tmp_path / "a.safetensors")]) == 0
    anchored = SalienceVector.load(tmp_path / "a.safetensors")
    assert anchored.fit_report["anchor"] == [0.0, 1.0] and anchored.link(0.0) == pytest.approx(1.0, abs=0.05)
    for name, shown in (("a", True), ("u", False)):  # the report names the anchor, and only when there is one
        assert main(["report", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / f"report-{name}")]) == 0
        assert ("anchor point (loss, score)" in (tmp_path / f"report-{name}" / "index.html").read_text()) is shown


def test_fit_leaves_out_unscored_checkpoints_with_a_note(store, scores_csv, tmp_path, capsys):
    lines = scores_csv.read_text().splitlines()
    part = tmp_path / "part.csv"
    part.write_text("\n".join(lines[:1] + lines[1:6]) + "\n")
    assert main(["fit", str(store), "--task", "arith", "--scores", str(part), "--out", str(tmp_path / "v")]) == 0
    captured = capsys.readouterr()
    assert "3 stored checkpoint(s) have no arith score" in captured.err
    assert SalienceVector.load(tmp_path / "v").fit_report["n_checkpoints"] == 5


def test_fit_bad_input(store, scores_csv, tmp_path, capsys):
    def err(*args: str) -> str:
        assert main(["fit", str(store), "--task", "arith", "--out", str(tmp_path / "v"), *args]) == 2
        assert not (tmp_path / "v").exists()
        return capsys.readouterr().err

    bad = tmp_path / "bad.csv"
    bad.write_text(scores_csv.read_text() + "runC/step9,0.5,runC\n")
    assert "runC/step9" in err("--scores", str(bad))
    assert "does not match checkpoint" in err("--scores", str(scores_csv), "--groups", "re:^runA")
    assert "single group" in err("--scores", str(scores_csv), "--groups", "re:^run")
    assert "no column 'mix'" in err("--scores", str(scores_csv), "--groups", "col:mix")
    assert "missing column(s) ['nope']" in err("--scores", str(scores_csv), "--score-column", "nope")
    dup = tmp_path / "dup.csv"
    dup.write_text(scores_csv.read_text() + scores_csv.read_text().splitlines()[1] + "\n")
    assert "appears twice" in err("--scores", str(dup))
    assert main(["fit", str(tmp_path), "--task", "x", "--scores", str(scores_csv), "--out", str(tmp_path / "v")]) == 2
    assert "not a loss store" in capsys.readouterr().err


def test_fit_from_several_stores_names_checkpoints_by_store(
    work, probe_file, store, scores_csv, tokenizer, tmp_path, capsys
):
    """One store per run (as each run's SalienceCallback save_dir would be) fits like one store of all runs."""
    _, runs = work
    stores = []
    for run, ckpts in runs.items():
        stores.append(tmp_path / "stores" / run)
        assert (
            main(["collect", *map(str, ckpts), "--probe", str(probe_file), "--out", str(stores[-1]), "--no-progress"])
            == 0
        )
    one, several = load_losses(store), load_losses(stores)
    # <store>/<name>, the store's path relative to the stores' common parent: here the same names as one store
    # collected with --name-parts 2, and the same rows.
    assert sorted(several.names) == sorted(one.names) and several.names[0].startswith("runA/")
    rows = dict(zip(one.names, one.losses))
    assert all(np.array_equal(rows[name], row) for name, row in zip(several.names, several.losses))
    vec = tmp_path / "v.safetensors"
    assert main(["fit", *map(str, stores), "--task", "arith", "--scores", str(scores_csv), "--groups", r"re:^(run\w)/",
                 "--out", str(vec)]) == 0
    rep = SalienceVector.load(vec).fit_report
    assert rep["checkpoints"] == several.names and sorted(set(rep["groups"])) == ["runA", "runB"]
    capsys.readouterr()

    # Bad input: a store named twice, a store of another probe, a directory that is not a store.
    assert main(["fit", str(stores[0]), str(stores[0]), "--task", "arith", "--scores", str(scores_csv),
                 "--out", str(tmp_path / "w")]) == 2
    assert "given twice" in capsys.readouterr().err
    other = ProbeSet.from_texts(["A different probe text."], tokenizer, 16)
    LossStore(tmp_path / "stores" / "other", other).write("step-1", np.ones(other.n_tokens, np.float32), step=1)
    assert main(["fit", *map(str, stores), str(tmp_path / "stores" / "other"), "--task", "arith", "--scores",
                 str(scores_csv), "--out", str(tmp_path / "w")]) == 2
    assert f"probe {other.fingerprint}" in capsys.readouterr().err
    assert main(["fit", str(stores[0]), str(tmp_path), "--task", "arith", "--scores", str(scores_csv),
                 "--out", str(tmp_path / "w")]) == 2
    assert "not a loss store" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_predict_table_and_json(store, scores_csv, tmp_path, capsys):
    vec = tmp_path / "v.safetensors"
    assert main(["fit", str(store), "--task", "arith", "--scores", str(scores_csv), "--out", str(vec)]) == 0
    capsys.readouterr()
    assert main(["predict", str(store), str(vec), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    table, sv = load_losses(store), SalienceVector.load(vec)
    assert [r["checkpoint"] for r in records] == table.names
    np.testing.assert_allclose([r["pred"] for r in records], sv.predict(table.losses), atol=1e-9)
    assert main(["predict", str(store), str(vec)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "arith" in lines[0] and len([ln for ln in lines if ln.startswith("run")]) == 8


def test_report_writes_self_contained_html_and_pngs(store, scores_csv, work, tmp_path, capsys):
    root, _ = work
    vec = tmp_path / "v.safetensors"
    assert main(["fit", str(store), "--task", "arith", "--scores", str(scores_csv), "--groups", "col:run",
                 "--out", str(vec)]) == 0
    out = tmp_path / "report"
    assert main(["report", str(vec), "--losses", str(store), "--tokenizer", str(root / "tok"), "--out", str(out),
                 "--top", "5"]) == 0
    for png in ("cv.png", "link.png", "weights.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<img" in page and "src='http" not in page
    shown = re.findall(r"sequence \d+: [\d.]+% of the salience", page)
    assert len(shown) == 5 and " the" in page  # --top 5 sequences, probe text decoded, salience shading present
    assert "rgba(192,57,43," in page and "uniform" in page and "label" in page


def test_fit_never_overwrites_a_store_file_and_needs_force_for_others(store, scores_csv, tmp_path, capsys):
    copy = Path(shutil.copytree(store, tmp_path / "store"))
    probe_bytes = (copy / "probe.safetensors").read_bytes()
    fit = ["fit", str(copy), "--task", "arith", "--scores", str(scores_csv), "--out"]
    for force in ([], ["--force"]):
        assert main([*fit, str(copy / "probe.safetensors"), *force]) == 2
        assert "is a file of the loss store" in capsys.readouterr().err
    assert main([*fit, str(copy / "losses" / "v.safetensors")]) == 2
    assert (copy / "probe.safetensors").read_bytes() == probe_bytes
    assert load_losses(copy).names == load_losses(store).names
    vec = tmp_path / "v.safetensors"
    vec.write_bytes(b"an earlier vector")
    assert main([*fit, str(vec)]) == 2
    assert f"{vec} exists; pass --force" in capsys.readouterr().err and vec.read_bytes() == b"an earlier vector"
    assert main([*fit, str(vec), "--force"]) == 0
    assert SalienceVector.load(vec).task == "arith"


def test_report_checks_the_tokenizer_against_the_probe(store, scores_csv, corpus, tmp_path, capsys):
    vec = tmp_path / "v.safetensors"
    assert main(["fit", str(store), "--task", "arith", "--scores", str(scores_csv), "--out", str(vec)]) == 0
    capsys.readouterr()
    train_tokenizer(corpus[:50], vocab_size=300).save_pretrained(tmp_path / "other_tok")
    out = tmp_path / "report"
    assert main(["report", str(vec), "--losses", str(store), "--tokenizer", str(tmp_path / "other_tok"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        f"--tokenizer {tmp_path / 'other_tok'}: the tokenizer" in err and "not the one this probe was built with" in err
    )
    assert main(["report", str(vec), "--tokenizer", str(tmp_path / "other_tok"), "--out", str(out)]) == 2
    assert "there is no probe: pass --losses or --probe" in capsys.readouterr().err
    assert not out.exists()


def test_non_utf8_inputs_are_named(work, store, scores_csv, tmp_path, capsys):
    root, _ = work
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 au lait, probe text in Latin-1.\n".encode("latin-1"))
    assert main(["probe", str(latin1), "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "p")]) == 2
    assert f"{latin1} is not UTF-8 text" in capsys.readouterr().err
    scores = tmp_path / "scores.csv"
    scores.write_bytes(scores_csv.read_bytes().replace(b"runA/step0,", b"runA/step0\xff,"))
    assert main(["fit", str(store), "--task", "arith", "--scores", str(scores), "--out", str(tmp_path / "v")]) == 2
    assert f"{scores} is not a UTF-8 CSV file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt", "scores.csv"]
