"""The trainer's own pieces: config overrides, packing, checkpoints, metrics log truncation on resume."""

import json

import pytest
import torch

from qlfast import config
from qlfast.trainer import checkpoint
from qlfast.trainer.logger import MetricsLogger


def test_overrides_parse_by_declared_type():
    cfg = config.from_args(["--rl.lr=3e-5", "--rl.group_size=4", "--model.checkpointing=true", "--rl.tis_cap=none",
                            "--rl.phases=100:10:2,200:20:3", "--train.name=x"])
    assert cfg.rl.lr == 3e-5 and isinstance(cfg.rl.group_size, int) and cfg.rl.group_size == 4
    assert cfg.model.checkpointing is True and cfg.rl.tis_cap is None and cfg.train.name == "x"
    phases = [(p.max_prompt_tokens, p.max_response_tokens, p.steps) for p in cfg.rl.phases]
    assert phases == [(100, 10, 2), (200, 20, 3)]


@pytest.mark.parametrize("arg, msg", [
    ("--rl.nope=1", "unknown field 'nope'"),
    ("--nosection.x=1", "unknown section"),
    ("--rl.group_size=four", "expected int"),
    ("--model.checkpointing=maybe", "expected bool"),
    ("--rl.phases=100:10", "max_prompt:max_response:steps"),
    ("--rl.lr", "overrides are --section.key=value"),
])
def test_bad_overrides_name_the_problem(arg, msg, capsys):
    with pytest.raises(SystemExit):
        config.from_args([arg])
    assert msg in capsys.readouterr().err


def test_presets_build_and_differ():
    assert set(config.PRESETS) >= {"tiny", "qwenlong-l1-32b", "qwen-7b"}
    big = config.from_args(["--preset", "qwenlong-l1-32b"])
    # the public recipe's values
    assert (big.rl.group_size, big.rl.batch_size, big.rl.mini_batch_size, big.rl.lr) == (8, 128, 32, 2e-6)
    assert (big.rl.temperature, big.rl.top_p, big.rl.overlong_window, big.rl.max_gen_rounds) == (0.7, 0.95, 1000, 10)
    assert [p.max_prompt_tokens for p in big.rl.phases] == [20480, 61440]


def test_checkpoint_is_atomic_and_latest_is_complete(tmp_path):
    def save_model(d):
        import os

        os.makedirs(d)
        open(os.path.join(d, "config.json"), "w").write("{}")

    checkpoint.save(tmp_path, "a", save_model=save_model, state={"step": 1}, trainer_state={"x": torch.ones(2)})
    checkpoint.save(tmp_path, "b", save_model=save_model, state={"step": 2}, trainer_state={"x": torch.zeros(2)})
    path = checkpoint.latest(tmp_path)
    assert path.name == "b"
    state, trainer = checkpoint.load(path)
    assert state["step"] == 2 and trainer["x"].tolist() == [0, 0]
    # a half-written checkpoint (crash before the rename) is never LATEST
    (tmp_path / "checkpoints" / "c.tmp").mkdir()
    assert checkpoint.latest(tmp_path).name == "b"


def test_rng_state_round_trip():
    s = checkpoint.rng_state()
    a = torch.rand(3)
    checkpoint.set_rng_state(s)
    assert torch.equal(torch.rand(3), a)


def test_metrics_truncate_after_resume_step(tmp_path):
    log = MetricsLogger(tmp_path, is_main=True, total_steps=4)
    for step in range(4):
        log.log(step, {"reward_mean": float(step)})
    log.log(2, {"accuracy": 0.5, "stage": "after phase 1"}, stream="eval")
    log.close()
    log = MetricsLogger(tmp_path, is_main=True, total_steps=4, resume_step=2)
    log.truncate_after(2)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stream"], r["step"]) for r in rows] == [("train", 0), ("train", 1), ("eval", 2)]
    log.close()


def test_bad_data_file_stops_with_file_row_field(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"document": "The vault code of Kestrel House is 4.", "question": "What is the vault code of '
                   'Kestrel House?", "answer": "4"}\n{"document": "x", "answer": "3"}\n')
    proc = subprocess.run([sys.executable, "-m", "qlfast.train", f"--train.out_dir={tmp_path}",
                           f"--data.train_files={bad}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{bad}: row 2: field 'question" in proc.stderr and "Traceback" not in proc.stderr
