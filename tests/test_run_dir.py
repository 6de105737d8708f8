"""A run folder's earlier work survives (issue #17): --resume without a checkpoint refuses instead of starting over,
and a fresh start moves an earlier run's outputs aside instead of deleting its metrics.jsonl."""

from __future__ import annotations

import os
import subprocess
import sys

from qlfast.trainer.state import set_aside_earlier_run


def test_a_fresh_start_moves_the_earlier_run_aside(tmp_path):
    run = tmp_path / "tiny"
    assert set_aside_earlier_run(run) is None  # nothing there: nothing moved
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    (run / "checkpoints" / "rl-000010").mkdir(parents=True)
    (run / "checkpoints" / "LATEST").write_text("rl-000010")
    (run / "tb").mkdir()  # open in the new run's logger: it stays
    first = set_aside_earlier_run(run)
    assert first is not None and first.parent == run / "earlier"
    assert (first / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert (first / "checkpoints" / "LATEST").read_text() == "rl-000010"
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists() and (run / "tb").exists()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    second = set_aside_earlier_run(run)  # within the same second: its own folder, the first one untouched
    assert second != first and (second / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (first / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_resume_without_a_checkpoint_refuses(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "metrics.jsonl").write_text('{"stream": "train", "step": 0}\n')
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "qlfast.train", "--resume", f"--train.out_dir={tmp_path}",
                          "--sft.steps=2", "--rl.phases=120:8:1", "--train.stop_at_step=1", "--data.synthetic_train=16",
                          "--data.synthetic_eval=4", "--data.synthetic_sft=16", "--train.eval_every_phase=false"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0, out.stdout[-2000:]
    assert out.stderr.count("--resume: ") == 1 and "holds no complete checkpoint" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert (tmp_path / "tiny" / "metrics.jsonl").read_text() == '{"stream": "train", "step": 0}\n'


def test_an_out_dir_that_cannot_be_written_is_one_message(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the run folder should go")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("QLFAST_TRACEBACK", None)
    out = subprocess.run([sys.executable, "-m", "qlfast.train", f"--train.out_dir={blocker}", "--sft.steps=2",
                          "--rl.phases=120:8:1", "--data.synthetic_train=16", "--data.synthetic_eval=4",
                          "--data.synthetic_sft=16"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"{blocker}" in out.stderr and "--train.out_dir" in out.stderr, out.stderr[-2000:]


def test_ranks_die_with_their_launcher(tmp_path):
    """kill -9 of torchrun left both ranks training to the end (each rank is in its own session)."""
    import signal
    import time

    pidfile = tmp_path / "child.pid"
    child = ("import os, time; from qlfast.trainer import comm; armed = comm.die_with_launcher(); "
             f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{armed}}'); time.sleep(120)")
    launcher = ("import subprocess, sys, time; "
                f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); time.sleep(120)")
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env)
    try:
        deadline = time.time() + 60
        while not (pidfile.exists() and pidfile.read_text().strip()) and time.time() < deadline:
            time.sleep(0.2)
        pid, armed = pidfile.read_text().split()
        assert armed == "True"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                break
            # a zombie whose parent is gone is reaped by init; /proc shows its state meanwhile
            try:
                if open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z":
                    break
            except FileNotFoundError:
                break
            time.sleep(0.2)
        else:
            os.kill(int(pid), signal.SIGKILL)
            raise AssertionError("the child outlived its launcher by 20 s")
    finally:
        parent.kill()
