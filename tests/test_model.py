"""QwenForCausalLM against transformers' Qwen2ForCausalLM / Qwen3ForCausalLM (fp32, tiny configs, CPU).

Yardstick: the same model run in float64 (ours); our fp32 log-probs and gradients must be as close to it as
transformers' fp32 eager (qlfast.testing.assert_close_vs_ref), and transformers' fp32 must agree with our float64
(the architectures are the same math).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from qlfast.model import QwenForCausalLM, positions_from_cu_seqlens, token_logprobs
from qlfast.testing import assert_close_vs_ref, rel_err

V = 301


def tiny(model_type, **kw):
    cfg = dict(model_type=model_type, vocab_size=V, hidden_size=128, intermediate_size=200, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
               rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=model_type == "qwen3", pad_token_id=0)
    cfg.update(kw)
    return cfg


def _perturb_(model, seed=0):
    """Random biases and norm weights too, so that every parameter's gradient path is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)


def _hf(model_type, ours):
    cls = Qwen2ForCausalLM if model_type == "qwen2" else Qwen3ForCausalLM
    hf = cls(ours.config).float().eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf


def _batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    ids = torch.randint(1, V, (t,), generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    targets = torch.randint(0, V, (t,), generator=gen)
    targets[cu[1:].long() - 1] = -100  # the last token of each sequence has nothing to predict
    return ids, cu, targets


def _ours_lp_grads(model, ids, cu, targets, weights):
    model.zero_grad(set_to_none=True)
    lp = token_logprobs(model, ids, None, cu, targets, temperature=0.8, backend="torch")
    (lp * weights).sum().backward()
    return lp.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _hf_lp(hf, ids, cu, targets, temperature=0.8):
    """Transformers, one sequence at a time (no packing on its side), log-probs from its own logits."""
    lps = []
    for s in range(cu.numel() - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        logits = hf(ids[None, a:b]).logits[0].float() / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, targets[a:b].clamp_min(0)[:, None])[:, 0]
        lps.append(torch.where(targets[a:b] == -100, 0.0, lp))
    return torch.cat(lps)


def _hf_lp_grads(hf, ids, cu, targets, weights):
    hf.zero_grad(set_to_none=True)
    lp = _hf_lp(hf, ids, cu, targets)
    (lp * weights).sum().backward()
    return lp.detach(), {n: p.grad.detach().clone() for n, p in hf.named_parameters()}


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_parity_with_transformers_packed(model_type):
    torch.manual_seed(0)
    ours = QwenForCausalLM.from_config(tiny(model_type), seed=1)
    _perturb_(ours)
    ours.set_options(attn_backend="torch")
    hf = _hf(model_type, ours)
    ref = QwenForCausalLM(ours.config).double()
    ref.load_state_dict(ours.state_dict())
    ref.set_options(attn_backend="torch")

    ids, cu, targets = _batch([37, 1, 80, 13])
    weights = torch.randn(ids.shape[0])
    lp, grads = _ours_lp_grads(ours, ids, cu, targets, weights)
    lp64, grads64 = _ours_lp_grads(ref, ids, cu, targets, weights.double())
    lp_hf, grads_hf = _hf_lp_grads(hf, ids, cu, targets, weights)

    assert torch.isfinite(lp).all() and (lp[targets != -100] < 0).all()
    assert_close_vs_ref("logprob", lp, lp64, lp_hf)
    names = dict(ours.named_parameters()).keys()
    assert set(names) == set(dict(hf.named_parameters()).keys())  # HF's parameter names, nothing more or less
    for n in names:
        assert grads[n].abs().sum() > 0, f"{n}: zero gradient"
        assert_close_vs_ref(f"grad {n}", grads[n], grads64[n], grads_hf[n])


def test_packed_equals_one_by_one():
    model = QwenForCausalLM.from_config(tiny("qwen2"), seed=3)
    model.set_options(attn_backend="torch")
    lengths = [5, 64, 1, 30]
    ids, cu, targets = _batch(lengths, seed=4)
    with torch.no_grad():
        packed = model(ids, None, cu)
        for s in range(len(lengths)):
            a, b = int(cu[s]), int(cu[s + 1])
            alone = model(ids[a:b])
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)
    pos = positions_from_cu_seqlens(cu, ids.shape[0])
    assert pos[:5].tolist() == list(range(5)) and pos[69].item() == 0 and pos[70:].tolist() == list(range(30))


@pytest.mark.parametrize("opts", [dict(checkpoint=True), dict(checkpoint=True, offload=True),
                                  dict(tiled_mlp=True, mlp_tile_tokens=17),
                                  dict(checkpoint=True, offload=True, tiled_mlp=True, mlp_tile_tokens=40),
                                  dict(attn_backend="sdpa")])
def test_memory_options_do_not_change_gradients(opts):
    model = QwenForCausalLM.from_config(tiny("qwen3", num_hidden_layers=2), seed=5)
    _perturb_(model)
    model.set_options(attn_backend="torch")
    ids, cu, targets = _batch([70, 33, 9], seed=6)
    weights = torch.randn(ids.shape[0])
    lp0, g0 = _ours_lp_grads(model, ids, cu, targets, weights)
    model.set_options(**opts)
    if opts.get("offload"):
        packs, orig = [], model._offloader.pack

        def counting_pack(t, target):
            packs.append(t.data_ptr() == target.data_ptr())
            return orig(t, target)

        model._offloader.pack = counting_pack
    lp1, g1 = _ours_lp_grads(model, ids, cu, targets, weights)
    if opts.get("offload"):
        assert sum(packs) == 2 and len(model._offloader.handles) == 2  # one offloaded input per layer
        assert all(h.host is None for h in model._offloader.handles)  # every one was brought back and released
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-6)
    for n in g0:
        # identical up to fp32 summation order (the tiled MLP sums weight gradients tile by tile)
        assert rel_err(g1[n], g0[n]) < 1e-5, f"{n}: rel err {rel_err(g1[n], g0[n]):.2e}"


def test_rope_scaling_matches_transformers():
    """YaRN, linear and dynamic rope scaling from the config give transformers' log-probs at long positions."""
    for scaling in ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                    {"rope_type": "linear", "factor": 2.0},
                    {"rope_type": "dynamic", "factor": 2.0}):
        cfg = tiny("qwen2", num_hidden_layers=1, max_position_embeddings=64,
                   rope_parameters={"rope_theta": 5000.0, **scaling})
        ours = QwenForCausalLM.from_config(cfg, seed=7)
        ours.set_options(attn_backend="torch")
        hf = _hf("qwen2", ours)
        ids, cu, targets = _batch([150], seed=8)
        with torch.no_grad():
            lp = token_logprobs(ours, ids, None, cu, targets, backend="torch")
            lp_hf = _hf_lp(hf, ids, cu, targets, temperature=1.0)
        torch.testing.assert_close(lp, lp_hf, rtol=1e-4, atol=1e-4, msg=lambda m, s=scaling: f"{s}: {m}")


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_save_load_round_trip_with_transformers(model_type, tmp_path):
    ours = QwenForCausalLM.from_config(tiny(model_type), seed=9)
    _perturb_(ours)
    ours.set_options(attn_backend="torch")
    ids, cu, targets = _batch([40, 21], seed=10)
    with torch.no_grad():
        lp = token_logprobs(ours, ids, None, cu, targets, backend="torch")
    # ours -> disk (sharded, to exercise the index) -> transformers
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=200_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if model_type == "qwen2" else "Qwen3ForCausalLM")
    with torch.no_grad():
        lp_hf = _hf_lp(hf, ids, cu, targets, temperature=1.0)
    torch.testing.assert_close(lp_hf, lp, rtol=1e-5, atol=1e-5)
    # transformers -> disk (its own format) -> ours
    hf.save_pretrained(tmp_path / "hf")
    back = QwenForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    back.set_options(attn_backend="torch")
    with torch.no_grad():
        lp_back = token_logprobs(back, ids, None, cu, targets, backend="torch")
    torch.testing.assert_close(lp_back, lp, rtol=1e-5, atol=1e-5)
    assert back.lm_head_weight.shape == (V, 128)


def test_bad_input_raises():
    model = QwenForCausalLM.from_config(tiny("qwen2", num_hidden_layers=1), seed=0)
    with pytest.raises(ValueError, match=r"packed \(T,\)"):
        model(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="int32"):
        model(torch.zeros(4, dtype=torch.long), None, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="model_type"):
        QwenForCausalLM.from_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="offload=True needs checkpoint"):
        model.set_options(offload=True)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [dict(), dict(checkpoint=True, offload=True, tiled_mlp=True, mlp_tile_tokens=256)])
def test_gpu_bf16_against_fp64(opts):
    """bf16 on the GPU (default attention backend, Liger if installed) vs the float64 model, as close as HF bf16."""
    cfg = tiny("qwen3", num_hidden_layers=2)
    ours = QwenForCausalLM.from_config(cfg, seed=11)
    _perturb_(ours)
    hf = _hf("qwen3", ours).to("cuda", torch.bfloat16)
    ref = QwenForCausalLM(ours.config).double()
    ref.load_state_dict(ours.state_dict())
    ref.set_options(attn_backend="torch")
    ours = ours.to("cuda", torch.bfloat16)
    ours.set_options(**opts)
    ids, cu, targets = _batch([700, 300, 57], seed=12)
    weights = torch.randn(ids.shape[0])
    lp, g = _ours_lp_grads(ours, ids.cuda(), cu.cuda(), targets.cuda(), weights.cuda())
    lp64, g64 = _ours_lp_grads(ref, ids, cu, targets, weights.double())
    lp_hf, g_hf = _hf_lp_grads(hf, ids.cuda(), cu.cuda(), targets.cuda(), weights.cuda())
    assert_close_vs_ref("logprob", lp.cpu(), lp64, lp_hf.cpu(), mult=3.0)
    for n in g64:
        assert_close_vs_ref(f"grad {n}", g[n].float().cpu(), g64[n], g_hf[n].float().cpu(), mult=3.0)


@pytest.mark.parametrize("lengths", [[30, 27, 33, 1], [5, 90, 2]])  # dense padded path, and the per-sequence loop
def test_sdpa_varlen_matches_reference(lengths):
    from qlfast.model.qwen import _sdpa_varlen
    from qlfast.ref.attention import naive_attention

    torch.manual_seed(0)
    t = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(t, 4, 32, dtype=torch.float64, requires_grad=True)
    k = torch.randn(t, 2, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(t, 2, 32, dtype=torch.float64, requires_grad=True)
    out = _sdpa_varlen(q, k, v, cu, 32 ** -0.5)
    ref = naive_attention(q, k, v, cu, cu, causal=True, softmax_scale=32 ** -0.5)[0]
    assert torch.allclose(out, ref, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-10)
