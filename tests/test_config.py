"""The config's start-up checks, --help and --print-config (issue #17: a bad value stops the run before any work,
with the field's name; one help on rank 0 listing every field; a printed config the CLI takes back)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys

import pytest

from qlfast import config


def _exit_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        config.from_args(argv)
    return e.value.code, capsys.readouterr()


@pytest.mark.parametrize("arg,message", [
    ("--train.checkpoint_every=0", "--train.checkpoint_every=0: must be >= 1"),  # was a ZeroDivisionError after SFT
    ("--sft.checkpoint_every=-1", "--sft.checkpoint_every=-1: must be >= 1"),
    ("--rl.top_p=1.5", "--rl.top_p=1.5: must be > 0 and <= 1"),
    ("--rl.group_size=1", "--rl.group_size=1: must be >= 2"),
    ("--rl.loss_agg=mean", "--rl.loss_agg=mean: must be one of token-mean,"),
    ("--train.device=tpu", "--train.device=tpu: must be one of auto, cpu, cuda"),
    ("--reward.judge_max_tokens=0", "--reward.judge_max_tokens=0: must be >= 1"),
])
def test_a_bad_value_is_refused_at_start_up_with_its_field(arg, message, capsys):
    code, out = _exit_of([arg], capsys)
    assert code == 2 and message in out.err, out.err


def test_every_bad_value_is_reported_at_once(capsys):
    code, out = _exit_of(["--train.checkpoint_every=0", "--rl.temperature=0", "--model.dtype=fp8"], capsys)
    assert code == 2
    for name in ("--train.checkpoint_every=0", "--rl.temperature=0.0", "--model.dtype=fp8"):
        assert name in out.err, out.err


def test_every_preset_is_valid_and_every_rule_names_a_field():
    for name, preset in config.PRESETS.items():
        assert config.validate(preset()) == [], name
    cfg = config.Config()
    fields = {f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}
    assert set(config.RULES) <= fields, set(config.RULES) - fields


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
def test_print_config_reads_back_as_the_same_config(preset, capsys):
    code, out = _exit_of(["--preset", preset, "--rl.lr=1e-5", "--data.train_files=a b.jsonl", "--print-config"], capsys)
    assert code == 0
    lines = [ln for ln in out.out.splitlines() if ln and not ln.startswith("#")]
    argv = [a for ln in lines for a in shlex.split(ln)]
    # the printed lines alone, on top of the tiny default, give back the whole config (phases in the CLI's form)
    again = config.from_args(argv)
    want = config.from_args(["--preset", preset, "--rl.lr=1e-5", "--data.train_files=a b.jsonl"])
    assert again == want
    # and each field carries its doc
    assert "# Save a checkpoint every this many RL steps" in out.out


def test_help_prints_once_under_torchrun_with_every_field():
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "qlfast.train", "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert text.count("usage: qlfast.train") == 1, text[:2000]
    assert "QwenLong-L1 (arXiv 2505.17667)" in text  # the trainer's own description, not the config module's
    cfg = config.Config()
    for s in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, s.name)):
            assert text.count(f"\n  --{s.name}.{f.name}=") == 1, f"{s.name}.{f.name}"
    assert "Save a checkpoint every this many SFT steps" in text
