"""QwenForCausalLM against transformers' Qwen2ForCausalLM / Qwen3ForCausalLM (fp32, tiny configs, CPU).

Yardstick: the same model run in float64 (ours); our fp32 log-probs and gradients must be as close to it as
transformers' fp32 eager (qlfast.testing.assert_close_vs_ref), and transformers' fp32 must agree with our float64
(the architectures are the same math).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from qlfast.model import QwenForCausalLM, positions_from_cu_seqlens, token_logprobs
from qlfast.testing import assert_close_vs_ref, one_triton_config, rel_err

_one_config = one_triton_config()  # one autotune config per kernel on a GPU

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


def test_from_pretrained_default_options_run_on_cpu(tmp_path):
    """The tiny preset's shape (head dim 32, which the triton kernels do not take) loads with default options and
    trains on CPU: attn_backend "auto" resolves to the sdpa backend there, and matches the torch reference."""
    cfg = tiny("qwen2", hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=None,
               num_hidden_layers=2)
    QwenForCausalLM.from_config(cfg, seed=3).save_pretrained(tmp_path / "m")
    model = QwenForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert model.options.attn_backend == "auto" and model.attention_backend() == "sdpa"
    ids, cu, targets = _batch([40, 9, 23], seed=2)
    weights = torch.randn(ids.shape[0])
    lp, g = _ours_lp_grads(model, ids, cu, targets, weights)
    model.set_options(attn_backend="torch")
    lp_ref, g_ref = _ours_lp_grads(model, ids, cu, targets, weights)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    for n in g_ref:
        assert rel_err(g[n], g_ref[n]) < 1e-5, n


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts on CPU tensors through the Triton interpreter")
def test_no_host_read_per_layer(monkeypatch):
    """A forward reads cu_seqlens on the host once (check + max_seqlen), whatever the number of layers: the layers'
    attention is called with check=False. Counted on the triton backend (the interpreter here), which itself reads
    nothing on the host."""
    calls = []
    for name in ("tolist", "item", "__bool__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    ids, cu, _ = _batch([20, 13], seed=1)
    counts = {}
    for layers in (1, 3):
        model = QwenForCausalLM.from_config(tiny("qwen2", num_hidden_layers=layers), seed=0)
        model.set_options(attn_backend="triton")
        calls.clear()
        with torch.no_grad():
            model(ids, None, cu)
        counts[layers] = len(calls)
    assert counts[1] == counts[3] == 1, counts


def test_offload_host_buffers_do_not_grow_with_varying_lengths():
    """One host buffer per layer, reused across steps and grown to the next power of two only when a longer batch
    needs it: micro-batches of varying length (as RL batches are) do not add buffers. Pooling by exact shape, as
    before, added L buffers per new length."""
    from qlfast.model.activation_checkpoint import size_class

    model = QwenForCausalLM.from_config(tiny("qwen2", num_hidden_layers=3, intermediate_size=64), seed=0)
    model.set_options(checkpoint=True, offload=True)
    off, h, item = model._offloader, 128, 4
    seen = []
    for step, lengths in enumerate(([60, 40], [33, 20], [130], [51, 7])):
        ids, cu, targets = _batch(lengths, seed=step)
        lp = token_logprobs(model, ids, None, cu, targets, backend="torch")
        lp.sum().backward()
        model.zero_grad(set_to_none=True)
        seen.append(ids.shape[0])
        assert len(off._slots) == 3, "one host buffer per layer"
        # each slot holds the largest input so far, rounded up to a power of two
        assert off.host_bytes() == 3 * size_class(max(seen) * h * item), (step, off.host_bytes())
        assert all(not s.busy for s in off._slots)
    bytes_after = off.host_bytes()
    for lengths in ([25], [80, 50]):  # within the size class already held
        ids, cu, targets = _batch(lengths, seed=9)
        token_logprobs(model, ids, None, cu, targets, backend="torch").sum().backward()
    assert off.host_bytes() == bytes_after


def test_offload_two_forwards_before_backward_keep_their_inputs():
    """Two graphs alive at once (two forwards, then both backwards): the second forward must not overwrite the
    first's offloaded inputs in the reused host buffers (it gets one-off buffers for busy slots)."""
    model = QwenForCausalLM.from_config(tiny("qwen2", num_hidden_layers=2, intermediate_size=64), seed=0)
    ids1, cu1, t1 = _batch([30, 10], seed=1)
    ids2, cu2, t2 = _batch([25, 15], seed=2)
    w1, w2 = torch.randn(40), torch.randn(40)

    def both(m):
        m.zero_grad(set_to_none=True)
        a = token_logprobs(m, ids1, None, cu1, t1, backend="torch")
        b = token_logprobs(m, ids2, None, cu2, t2, backend="torch")
        ((a * w1).sum() + (b * w2).sum()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    g0 = both(model)
    model.set_options(checkpoint=True, offload=True)
    g1 = both(model)
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 1e-5, n


def test_liger_is_opt_in(monkeypatch):
    """An installed liger_kernel does not switch the model to Liger kernels: only use_liger=True does."""
    import qlfast.model.qwen as qwen

    monkeypatch.setattr(qwen, "_liger_available", lambda: True)
    model = QwenForCausalLM.from_config(tiny("qwen2", num_hidden_layers=1), seed=0)
    assert model.options.use_liger is False
    assert not any(getattr(m, "use_liger", False) for m in model.modules())
    model.set_options(use_liger=True)
    assert all(m.use_liger for m in model.modules() if hasattr(m, "use_liger"))
    monkeypatch.setattr(qwen, "_liger_available", lambda: False)
    with pytest.raises(ValueError, match="liger_kernel is not installed"):
        model.set_options(use_liger=True)
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        model.set_options(use_liger=False, attn_backend="cuda")


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


@pytest.mark.parametrize("lengths", [[30, 27, 33, 1], [5, 90, 2]])  # one padded bucket, and several
def test_sdpa_varlen_matches_reference(lengths):
    """The model's "sdpa" attention is qlfast.ops.flash_attention's sdpa backend (the one sdpa varlen path)."""
    from qlfast.ops.flash_attention import flash_attention
    from qlfast.ref.attention import naive_attention

    torch.manual_seed(0)
    t = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(t, 4, 32, dtype=torch.float64, requires_grad=True)
    k = torch.randn(t, 2, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(t, 2, 32, dtype=torch.float64, requires_grad=True)
    out = flash_attention(q, k, v, cu, softmax_scale=32 ** -0.5, backend="sdpa")[0]
    ref = naive_attention(q, k, v, cu, cu, causal=True, softmax_scale=32 ** -0.5)[0]
    assert torch.allclose(out, ref, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-10)
