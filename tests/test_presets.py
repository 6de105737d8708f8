"""Presets that train: every phase of every preset trains a stated, non-zero amount; epochs per phase from the CLI;
a phase of 0 steps is an error unless --rl.allow_empty_phases=true (at parse time and once the length bins are
known)."""

import subprocess
import sys

import pytest

from qlfast import config
from qlfast.rl.curriculum import Curriculum, Phase, assign_bins


def test_phases_take_steps_or_epochs():
    cfg = config.from_args(["--rl.phases=100:10:2.5ep,200:20:3"])
    assert [(p.max_prompt_tokens, p.max_response_tokens, p.steps, p.epochs) for p in cfg.rl.phases] == \
        [(100, 10, None, 2.5), (200, 20, 3, None)]
    # the curriculum turns epochs into steps over the phase's bin: ceil(2.5 x 7 / 4) = 5
    phases = [Phase(p.max_prompt_tokens, p.max_response_tokens, steps=p.steps, epochs=p.epochs)
              for p in cfg.rl.phases]
    bins = assign_bins([50] * 7 + [150] * 3, [100, 200])
    assert Curriculum(phases, bins, batch_size=4).steps == [5, 3]


@pytest.mark.parametrize("arg, msg", [
    ("--rl.phases=100:10:0", "phase 1 (prompts <= 100 tokens, 0 steps) trains 0 steps"),
    ("--rl.phases=100:10:4,200:10:0ep", "phase 2 (prompts <= 200 tokens, 0 epochs) trains 0 steps"),
    ("--rl.phases=100:10:xep", "max_prompt:max_response:<epochs>ep"),
    ("--rl.phases=100:10:-1", "steps / epochs >= 0"),
    ("--rollout.tp=0", "--rollout.tp=0: must be >= 1"),
])
def test_bad_phases_name_the_problem(arg, msg, capsys):
    with pytest.raises(SystemExit):
        config.from_args([arg])
    assert msg in capsys.readouterr().err


def test_empty_phase_allowed_only_when_asked():
    cfg = config.from_args(["--rl.phases=100:10:0,200:10:2", "--rl.allow_empty_phases=true"])
    assert cfg.rl.phases[0].steps == 0
    assert config.empty_phase_error(cfg.rl, [0, 2]) is None
    cfg.rl.allow_empty_phases = False
    msg = config.empty_phase_error(cfg.rl, [0, 2], "length bins: phase 0 (<= 100 tokens): 0")
    assert "phase 1" in msg and "length bins" in msg and "--rl.allow_empty_phases=true" in msg


def test_every_preset_trains_a_stated_amount():
    for name, make in config.PRESETS.items():
        cfg = make()
        assert cfg.rl.phases and all((p.steps or 0) > 0 or (p.epochs or 0) > 0 for p in cfg.rl.phases), name
        doc = " ".join(make.__doc__.split())
        assert ("GPU" in doc or "CPU" in doc) and ("steps" in doc or "epochs" in doc), name
    big = config.from_args(["--preset", "qwenlong-l1-32b"])
    # the public recipe: 30 epochs at batch 128 (scripts/rl_4nodes_dapo.sh), over the paper's two phases
    assert [(p.max_prompt_tokens, p.epochs) for p in big.rl.phases] == [(20480, 30), (61440, 30)]
    assert big.rl.batch_size == 128 and big.rollout.tp == 4
    assert "rl_4nodes_dapo.sh" in config.qwenlong_l1_32b.__doc__
    seven = config.from_args(["--preset", "qwen-7b"])
    assert [p.epochs for p in seven.rl.phases] == [30, 30] and seven.rollout.tp == 2


def test_print_config_shows_the_amount():
    out = subprocess.run([sys.executable, "-m", "qlfast.train", "--preset", "qwenlong-l1-32b", "--print-config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "\n--rl.phases=20480:10240:30ep,61440:10240:30ep\n" in out.stdout


def test_train_stops_on_an_empty_bin_and_a_bad_tp(tmp_path):
    """Once the data is binned: a phase whose bin is empty (no synthetic prompt has <= 20 tokens) trains 0 steps."""
    base = [sys.executable, "-m", "qlfast.train", f"--train.out_dir={tmp_path}", "--sft.steps=0",
            "--data.synthetic_train=16", "--data.synthetic_eval=4"]
    out = subprocess.run(base + ["--rl.phases=20:24:1ep,200:24:2"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "phase 1 (prompts <= 20 tokens, 1 epochs) trains 0 steps" in out.stderr, \
        out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    out = subprocess.run(base + ["--rollout.tp=2"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "--rollout.tp=2 must divide the number of ranks (1)" in out.stderr
    assert "Traceback" not in out.stderr
