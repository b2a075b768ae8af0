"""The files of a loss store as a filesystem presents them: FIFOs and other non-regular entries, temporary
files of killed writers, permissions under a umask, long checkpoint names, out-of-range metadata, a full disk.

Each scenario that could block, needs a umask or a mount runs in a subprocess, so a regression fails the test
(by its timeout) instead of hanging the suite or changing the test process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from offline_helpers import subprocess_env
from safetensors import safe_open

from csv_callback import ProbeSet
from csv_callback.files import atomic_save
from csv_callback.store import LossStore, file_name, load_losses

TIMEOUT = 120  # seconds; far above the few seconds each subprocess needs (mostly importing torch)


@pytest.fixture
def probe_file(tmp_path, probe) -> Path:
    """A copy of the probe outside any store, for subprocesses to load."""
    probe.save(tmp_path / "probe_copy.safetensors")
    return tmp_path / "probe_copy.safetensors"


def run_python(code: str, *args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (after ``prefix``, e.g. ``unshare``), failing the test on a timeout."""
    cmd = (prefix or []) + [sys.executable, "-c", textwrap.dedent(code), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=subprocess_env())
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(
            f"python -c <code> {' '.join(args)} did not finish in {TIMEOUT} s (blocked?); its output so far: {out!r}"
        )


def test_fifos_and_other_non_regular_files_are_refused_without_being_opened(store, probe_file):
    # Each case replaces one file by a non-regular entry; the subprocess prints each outcome as soon as it
    # has it, so a case that blocks shows up in the timeout message.
    code = """
        import os, shutil, sys
        from pathlib import Path
        from csv_callback.probe import ProbeSet
        from csv_callback.store import LossStore, load_losses

        root, probe = Path(sys.argv[1]), ProbeSet.load(sys.argv[2])
        losses = root / "losses"
        stray = losses / "stray.safetensors"

        def outcome(case, call):
            try:
                call()
                print(case, "OK", flush=True)
            except ValueError as e:
                print(case, "ValueError", e, flush=True)

        os.mkfifo(stray)
        outcome("fifo", lambda: load_losses(root))
        os.remove(stray)
        os.mkfifo(root / "elsewhere")
        os.symlink(root / "elsewhere", stray)
        outcome("symlink", lambda: load_losses(root))
        os.remove(stray)
        stray.mkdir()
        outcome("directory", lambda: load_losses(root))
        stray.rmdir()
        probe_file = root / "probe.safetensors"
        shutil.move(probe_file, root / "probe.bak")
        os.mkfifo(probe_file)
        outcome("probe_load", lambda: load_losses(root))
        outcome("probe_open", lambda: LossStore(root))
        outcome("probe_open_with_probe", lambda: LossStore(root, probe))
    """
    proc = run_python(code, str(store.root), str(probe_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    stray = store.root / "losses" / "stray.safetensors"
    assert got["fifo"] == f"ValueError {stray} is a FIFO (named pipe), not a regular file, so it was not read; " \
                          "replace it with the file it stands for, or remove it."
    assert got["symlink"].startswith(f"ValueError {stray} is a FIFO (named pipe), not a regular file")
    assert got["directory"].startswith(f"ValueError {stray} is a directory, not a regular file")
    for case in ("probe_load", "probe_open", "probe_open_with_probe"):
        assert f"{store.root / 'probe.safetensors'} is a FIFO (named pipe), not a regular file" in got[case], case


def test_opening_a_store_removes_temporary_files_of_dead_writers_only(store, tmp_path):
    root, losses, host = store.root, store.root / "losses", socket.gethostname()
    # Real dead writers: each process creates its temporary file as atomic_save names it, then is killed
    # before it can rename it; as written today (with the host) and before the host was recorded.
    kill = """
        import os, signal, socket, sys
        name = sys.argv[1].format(host=socket.gethostname(), pid=os.getpid())
        open(name, "wb").write(b"half a safetensors file")
        os.kill(os.getpid(), signal.SIGKILL)
    """
    dead = []
    for directory, pattern in [
        (losses, ".step-2.safetensors.tmp-{host}-{pid}"),
        (losses, ".step-3.safetensors.tmp-{pid}"),
        (root, ".probe.safetensors.tmp-{host}-{pid}"),
    ]:
        proc = run_python(kill, str(directory / pattern))
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        dead += [p for p in directory.iterdir() if ".tmp-" in p.name and p not in dead]
    assert len(dead) == 3
    # A live writer's (this process's), and a fresh one from another host sharing the filesystem, are kept;
    # one from another host that is a day old cannot be a write in progress.
    live = [losses / f".step-4.safetensors.tmp-{host}-{os.getpid()}", losses / f".step-5.safetensors.tmp-{os.getpid()}",
            losses / ".step-6.safetensors.tmp-other-node-7-123"]
    old = losses / ".step-7.safetensors.tmp-other-node-7-124"
    for p in [*live, old]:
        p.write_bytes(b"in progress")
    os.utime(old, (0, 0))

    reopened = LossStore(root)
    assert [p for p in [*dead, old] if p.exists()] == []
    assert all(p.exists() for p in live)
    assert reopened.fingerprint == store.fingerprint
    # load_losses cleans as well, and still reads every checkpoint.
    proc = run_python(kill, str(losses / ".step-8.safetensors.tmp-{host}-{pid}"))
    assert proc.returncode == -signal.SIGKILL
    assert load_losses(root).names == ["step-0", "step-1", "step-2"]
    assert sorted(p.name for p in losses.iterdir() if ".tmp-" in p.name) == sorted(p.name for p in live)


def test_files_are_written_with_the_permissions_the_umask_gives(tmp_path, probe_file):
    code = """
        import json, os, sys
        from pathlib import Path
        import numpy as np
        from csv_callback.probe import ProbeSet
        from csv_callback.store import LossStore

        out, umask = Path(sys.argv[1]), int(sys.argv[3], 8)
        os.umask(umask)
        probe = ProbeSet.load(sys.argv[2])
        probe.save(out / "probe.safetensors")
        store = LossStore(out / "store", probe, run_id="r")
        store.write("step-1", np.ones(probe.n_tokens, np.float32), step=1)
        files = [out / "probe.safetensors", store.root / "probe.safetensors", store.root / "run.json",
                 store.path_for("step-1")]
        print(json.dumps({p.name: oct(p.stat().st_mode & 0o777) for p in files}))
    """
    for umask, mode in [("022", "0o644"), ("027", "0o640")]:
        out = tmp_path / umask
        out.mkdir()
        proc = run_python(code, str(out), str(probe_file), umask)
        assert proc.returncode == 0, proc.stderr[-3000:]
        modes = json.loads(proc.stdout)
        assert modes == {"probe.safetensors": mode, "run.json": mode, "step-1.safetensors": mode}, umask


def test_long_checkpoint_names_get_a_short_file_name_and_keep_their_name(store, probe, tmp_path):
    ones = np.ones(probe.n_tokens, np.float32)
    long_a, long_b = "runA/" + "x" * 300, "runA/" + "x" * 299 + "y"  # same first 226 characters
    for i, name in enumerate([long_a, long_b]):
        store.write(name, ones * (i + 5), step=10 + i)
    fa, fb = store.path_for(long_a).name, store.path_for(long_b).name
    assert len(fa.encode()) == len(fb.encode()) == 255 and fa != fb
    assert fa.startswith("runA_xxxx") and fa.endswith(".safetensors")
    table = load_losses(store.root)
    assert table.names == ["step-0", "step-1", "step-2", long_a, long_b]
    assert table.losses[3:, 0].tolist() == [5.0, 6.0]
    # A name that gives the same file name is still refused, not written over long_a.
    twin = fa.removesuffix(".safetensors")
    assert file_name(twin) == fa
    with pytest.raises(ValueError, match=r"already holds checkpoint 'runA/x+', and 'runA_x+-[0-9a-f]{16}' would"):
        store.write(twin, ones, step=12)
    assert long_a in store
    # A long file name of one's own (up to the 255 bytes a file name may have) is written as well.
    own = tmp_path / ("p" * 243 + ".safetensors")
    probe.save(own)
    assert ProbeSet.load(own).fingerprint == probe.fingerprint
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_step_beyond_int64_is_refused_naming_the_file(store, probe):
    path = store.path_for("step-1")
    with safe_open(str(path), framework="pt") as f:
        meta, tensor = f.metadata(), f.get_tensor("losses")
    atomic_save({"losses": tensor}, {**meta, "step": str(2**63)}, path)
    with pytest.raises(ValueError, match=rf"{path} is not a csv-callback loss file \(step=9223372036854775808 does "
                                         r"not fit int64\); delete or re-collect it"):
        load_losses(store.root)
    with pytest.raises(ValueError, match=r"step=-9223372036854775809 does not fit int64\); pass an int step"):
        store.write("step-9", np.ones(probe.n_tokens, np.float32), step=-(2**63) - 1)
    assert "step-9" not in store


def in_full_tmpfs(tmp_path: Path, code: str, *args: str) -> dict:
    """Run ``code`` with a 256 KiB tmpfs mounted at ``tmp_path / "small"`` (in a private mount namespace, as
    the root of a user namespace: no privileges needed) and return the JSON it prints."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare to mount a tiny tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    mount = f'mount -t tmpfs -o size=256k tmpfs {small} && exec "$0" "$@"'
    proc = run_python(code, str(small), *args, prefix=["unshare", "-rm", "sh", "-c", mount])
    if proc.returncode != 0 and "mount" in proc.stderr and "ermission" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_a_full_disk_says_so_names_the_file_and_leaves_no_temporary_file(tmp_path, probe_file):
    code = """
        import json, os, sys
        from pathlib import Path
        import numpy as np
        from csv_callback.probe import ProbeSet
        from csv_callback.store import LossStore, load_losses

        small, probe = Path(sys.argv[1]), ProbeSet.load(sys.argv[2])
        store = LossStore(small / "store", probe)
        store.write("step-0", np.ones(probe.n_tokens, np.float32), step=0)
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError:
            pass  # the tmpfs is full
        out = {}
        for case, call in [("write", lambda: store.write("step-1", np.ones(probe.n_tokens, np.float32), step=1)),
                           ("create", lambda: LossStore(small / "other", probe))]:
            try:
                call()
                out[case] = None
            except Exception as e:
                out[case] = [type(e).__name__, getattr(e, "errno", None), str(e)]
        out["files"] = sorted(p.name for p in small.rglob("*"))
        out["names"] = load_losses(small / "store").names
        print(json.dumps(out))
    """
    out = in_full_tmpfs(tmp_path, code, str(probe_file))
    small = tmp_path / "small"
    kind, errno_, message = out["write"]
    assert (kind, errno_) == ("OSError", 28)
    assert message.startswith(f"[Errno 28] disk full: cannot write {small / 'store/losses/step-1.safetensors'} "
                              "(No space left on device); nothing of it was written and an earlier version of it, if "
                              "any, is intact. Free space on that filesystem")
    kind, _, message = out["create"]
    assert (
        kind == "ValueError" and f"cannot create the loss store {small / 'other'} (disk full: cannot write" in message
    )
    assert [f for f in out["files"] if ".tmp-" in f] == []
    assert out["names"] == ["step-0"]  # what was saved before stays readable


def test_other_write_errors_name_the_file_and_leave_no_temporary_file(tmp_path, probe):
    # A real EFBIG: the file-size limit (RLIMIT_FSIZE) is below the size of the probe file.
    code = """
        import json, resource, signal, sys
        from pathlib import Path
        from csv_callback.probe import ProbeSet

        out, probe = Path(sys.argv[1]), ProbeSet.load(sys.argv[2])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))
        try:
            probe.save(out)
        except Exception as e:
            print(json.dumps([type(e).__name__, getattr(e, "errno", None), str(e)]))
    """
    target = tmp_path / "probe.safetensors"
    probe.save(target)
    before = target.read_bytes()
    proc = run_python(code, str(target), str(target))
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind, errno_, message = json.loads(proc.stdout)
    assert (kind, errno_) == ("OSError", 27)
    assert message == f"[Errno 27] cannot write {target} (File too large); nothing of it was written and an earlier " \
                      "version of it, if any, is intact."
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["probe.safetensors"]

