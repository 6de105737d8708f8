"""fp32 master weights under bf16 compute (qlfast/trainer/precision.py): the checks of tests/dist/_worker_precision.py
in one process (replicated), and under torchrun for 2 ranks (replicated with the masters all-reduced, and FSDP2 with
MixedPrecisionPolicy); the master/compute split's bookkeeping: checkpoints hold the masters, exports the compute
dtype."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from qlfast.model import QwenForCausalLM
from qlfast.testing import run_torchrun
from qlfast.trainer import optim, precision
from qlfast.trainer.comm import Env

WORKER = Path(__file__).parent / "dist" / "_worker_precision.py"
_spec = importlib.util.spec_from_file_location("_worker_precision", WORKER)
W = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = W  # dataclasses look their module up there
_spec.loader.exec_module(W)


def test_one_rl_step_at_2e6_keeps_its_update_in_the_masters():
    numbers = W.case(Env(0, 1, 0, torch.device("cpu")), W.groups(0), "replicated x1")
    print(numbers)


@pytest.mark.dist
def test_two_ranks_replicated_and_fsdp2():
    out = run_torchrun(str(WORKER), nproc=2, timeout=600)
    assert "OK precision" in out and "FSDP2 x2" in out and "replicated x2" in out


def test_attach_is_a_no_op_in_one_dtype():
    model = QwenForCausalLM.from_config(W.CFG, seed=0)
    assert precision.attach(model, torch.float32) is None
    assert precision.trainable(model) == [p for p in model.parameters() if p.requires_grad]
    assert precision.state_dict(model).keys() == model.state_dict().keys()


def test_checkpoint_holds_masters_and_export_the_compute_dtype(tmp_path):
    model = QwenForCausalLM.from_config(W.CFG, seed=0)
    model.set_options(attn_backend="sdpa")
    m = precision.attach(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in precision.trainable(model)} == {torch.float32}
    with torch.no_grad():  # an update too small for bf16: only the masters hold it
        for p in m.masters:
            p.add_(1e-6)
    precision.after_step(model)
    sd = precision.state_dict(model)
    assert all(sd[n].dtype == torch.float32 for n in m.names)
    torch.save(sd, tmp_path / "trainer.pt")
    other = QwenForCausalLM.from_config(W.CFG, seed=1)
    precision.attach(other, torch.bfloat16)
    precision.load_state_dict(other, torch.load(tmp_path / "trainer.pt"))
    for a, b in zip(precision.trainable(model), precision.trainable(other)):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b) and a.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "hf")
    back = QwenForCausalLM.from_pretrained(tmp_path / "hf")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}


def test_sft_step_moves_masters_and_working_copy_together():
    """The optimizer steps the masters and the working copy follows (optim.clip_and_step -> precision.after_step)."""
    from qlfast.ops.linear_logprob import linear_logprob

    model = QwenForCausalLM.from_config(W.CFG, seed=0)
    model.set_options(attn_backend="sdpa")
    precision.attach(model, torch.bfloat16)
    opt = optim.adamw(model, 1e-3)
    sched = optim.schedule(opt, 0)
    ids = torch.randint(0, W.CFG["vocab_size"], (57,), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # two micro-batches: the masters accumulate both gradients in fp32
        linear_logprob(model(ids), model.lm_head_weight, ids, backend="torch").sum().backward()
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad.clone() for p in precision.trainable(model)]
    assert all(g.dtype == torch.float32 for g in grads)
    norm, ok = optim.clip_and_step(model, opt, sched, max_norm=1e9)
    assert ok and norm > 0
    for w, mst in zip(model.parameters(), precision.trainable(model)):
        assert torch.equal(w, mst.to(torch.bfloat16))


@pytest.mark.parametrize("args, msg", [
    (["--model.dtype=float32", "--model.master_dtype=bfloat16"], "must be --model.dtype=float32 or wider"),
    (["--model.dtype=bfloat16", "--model.master_dtype=float16"], "must be --model.dtype=bfloat16 or wider"),
    (["--model.master_dtype=fp8"], "--model.master_dtype=fp8: must be one of"),
    (["--rl.kl_type=k4"], "--rl.kl_type=k4: must be one of k1, k2, k3"),
    (["--rl.ref_offload=true"], "needs --model.fsdp=true"),
    (["--rollout.engine=vllm"], "unknown field 'engine'"),  # removed: nothing read it
])
def test_precision_and_kl_fields_are_checked_at_parse_time(args, msg, capsys):
    from qlfast import config

    with pytest.raises(SystemExit):
        config.from_args(args)
    assert msg in capsys.readouterr().err


def test_bf16_with_fp32_masters_is_the_default_split():
    from qlfast import config

    cfg = config.from_args(["--model.dtype=bfloat16"])
    assert cfg.model.master_dtype == "float32" and precision.param_dtype(cfg.model) == torch.bfloat16
    cfg = config.from_args(["--model.dtype=bfloat16", "--model.master_dtype=bfloat16"])
    assert precision.param_dtype(cfg.model) is None
