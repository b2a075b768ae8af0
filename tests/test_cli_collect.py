"""`csv-callback collect` when a check or the disk fails: nothing is created before the model has scored the
probe, a full disk is reported with what was saved, a crafted trainer_state.json costs only the step."""

import shutil
import subprocess
from pathlib import Path

import pytest
from offline_helpers import subprocess_env

from csv_callback import ProbeSet
from csv_callback.cli import main
from csv_callback.store import load_losses
from csv_callback.testing import tiny_gpt2


@pytest.fixture(scope="module")
def short_context(tmp_path_factory, tokenizer):
    """Two HF checkpoints of a model with a 16-token context window, saved with their tokenizer."""
    root = tmp_path_factory.mktemp("short")
    dirs = []
    for step in (1, 2):
        d = root / f"checkpoint-{step}"
        tiny_gpt2(len(tokenizer), n_positions=16, seed=step).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs.append(d)
    return dirs


def probe_file(path: Path, tokenizer, corpus, max_length: int, n: int = 3) -> Path:
    ProbeSet.from_texts([t[:400] for t in corpus[:n]], tokenizer, max_length=max_length).save(path)
    return path


def test_a_probe_longer_than_the_context_creates_nothing_so_a_fixed_probe_can_follow(
        short_context, tokenizer, corpus, tmp_path, capsys):
    out = tmp_path / "store"
    args = [*map(str, short_context), "--out", str(out), "--no-progress"]
    assert (
        main(["collect", *args, "--probe", str(probe_file(tmp_path / "long.safetensors", tokenizer, corpus, 64))]) == 2
    )
    assert not out.exists()
    err = capsys.readouterr().err
    assert f"checkpoint checkpoint-1 ({short_context[0]})" in err and "takes at most 16 positions" in err
    assert (
        main(["collect", *args, "--probe", str(probe_file(tmp_path / "fit.safetensors", tokenizer, corpus, 16))]) == 0
    )
    table = load_losses(out)
    assert table.names == ["checkpoint-1", "checkpoint-2"] and table.steps.tolist() == [1, 2]


def test_an_overflowing_global_step_costs_only_the_step(short_context, tokenizer, corpus, tmp_path, capsys):
    ckpt = Path(shutil.copytree(short_context[0], tmp_path / "checkpoint-7"))
    (ckpt / "trainer_state.json").write_text('{"global_step": 1e999}')  # JSON for a float beyond float64: inf
    out = tmp_path / "store"
    with pytest.warns(UserWarning, match=r"trainer_state.json: global_step is inf, not a step number; the step is "
                                         r"taken from the name 'checkpoint-7'"):
        assert main(["collect", str(ckpt), "--out", str(out), "--no-progress", "--probe",
                     str(probe_file(tmp_path / "p.safetensors", tokenizer, corpus, 16))]) == 0
    assert load_losses(out).steps.tolist() == [7]


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` and tmpfs mounts in a user namespace "
                    "(a small filesystem to fill)")
def test_a_full_disk_is_reported_with_what_was_saved(short_context, tokenizer, corpus, tmp_path):
    """collect on a real filesystem that holds the probe and one checkpoint's losses, not two."""
    probe = probe_file(tmp_path / "p.safetensors", tokenizer, corpus, 16, n=40)
    # Room for exactly the probe and one loss file, measured by collecting one checkpoint elsewhere.
    assert main(["collect", str(short_context[0]), "--probe", str(probe), "--out", str(tmp_path / "one"),
                 "--no-progress"]) == 0
    page = 4096
    pages = sum(-(-f.stat().st_size // page) for f in (probe, tmp_path / "one" / "losses" / "checkpoint-1.safetensors"))
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "store"
    command = (f"mount -t tmpfs -o size={pages * page // 1024}k tmpfs {disk} && csv-callback collect "
               f"{' '.join(map(str, short_context))} --probe {probe} --out {out} --no-progress; code=$?; "
               f"ls -a {out}/losses; exit $code")
    run = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=300,
                         env=subprocess_env())
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert "error: checkpoint checkpoint-2: disk full" in run.stderr
    assert f"1 checkpoint(s) of this run are saved in {out} (last: checkpoint-1); re-run the same command" in run.stderr
    # The mount ended with the namespace; what collect left on it was one complete file and no temporary one.
    assert run.stdout.split() == [".", "..", "checkpoint-1.safetensors"]


def test_trainer_state_values_that_are_no_steps_are_ignored(short_context, tmp_path):
    from csv_callback.collect import resolve_checkpoints

    for state, want in [('{"global_step": 12}', 12), ('{"global_step": 12.0}', 12), ('{"global_step": -3}', 5),
                        ('{"global_step": 9223372036854775808}', 5), ('{"global_step": true}', 5),
                        ("[" * 100_000 + "]" * 100_000, 5), ("not json", 5)]:
        ckpt = tmp_path / "step-5"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(short_context[0], ckpt)
        (ckpt / "trainer_state.json").write_text(state)
        if want == 12:
            assert resolve_checkpoints([ckpt])[0].step == want
        else:
            with pytest.warns(UserWarning, match="the step is taken from the name 'step-5'"):
                assert resolve_checkpoints([ckpt])[0].step == want
