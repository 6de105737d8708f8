"""One writer per run folder (qlfast/trainer/runlock.py): a second run is refused with the holder's pid and host; the
lock dies with its holder; a trainer launched on a locked folder stops on every rank without touching it."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from qlfast.trainer import runlock

HOLD = ("import sys, time; from qlfast.trainer import runlock; runlock.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)")


def _holder(run_dir):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_acquire_is_refused_and_a_dead_holder_releases(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    p = _holder(run_dir)
    try:
        with pytest.raises(runlock.RunLocked) as e:
            runlock.acquire(run_dir)
        msg = str(e.value)
        assert msg.startswith(f"{run_dir} is in use by pid {p.pid} on host {socket.gethostname()} since ")
        assert msg.endswith("; wait for it or use another --train.name")
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    lock = runlock.acquire(run_dir)  # the file is left behind, the flock is not
    assert lock.note and f"pid {p.pid}" in lock.note and "did not exit cleanly" in lock.note
    assert f'"pid": {os.getpid()}' in (run_dir / ".lock").read_text()
    lock.release()
    again = runlock.acquire(run_dir)  # a clean release leaves nothing to report
    assert again.note is None
    again.release()


def test_trainer_on_a_locked_folder_stops_on_every_rank(tmp_path):
    """The run stops non-zero with the message, said once (rank 0's outcome is shared, so no rank waits at a
    collective: the timeout would fail the test), and nothing is written into the run folder."""
    lock = runlock.acquire(tmp_path / "busy")
    try:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "qlfast.train", "--preset=tiny", f"--train.out_dir={tmp_path}", "--train.name=busy",
                            "--train.device=cpu"], capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in out, out
    assert out.count("is in use by") == 1, out  # said once, by rank 0
    assert sorted(os.listdir(tmp_path / "busy")) == [".lock"]
