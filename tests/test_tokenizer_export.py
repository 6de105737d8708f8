"""An exported model directory gives the same token ids for the same text in qlfast, transformers and vLLM.

Next to a qwen2 config.json, transformers' AutoTokenizer (and vLLM, which calls it) builds Qwen2Tokenizer over the
saved vocabulary with Qwen2's own pre-tokeniser; the tiny tokenizer must therefore be trained with that pre-tokeniser,
or an exported model is evaluated on ids it never saw in training (issue #17: 101 ids in qlfast, 105 elsewhere).
"""

from __future__ import annotations

import pytest

from qlfast.config import DataConfig
from qlfast.data import synthetic, template
from qlfast.data import tokenizer as tok
from qlfast.model import QwenForCausalLM
from qlfast.trainer.build import synthetic_task


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("export")
    tokenizer = tok.load_tokenizer(tok.build_tokenizer(1024, seed=0))
    config = {"model_type": "qwen2", "vocab_size": -(-len(tokenizer) // 64) * 64, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 512, "tie_word_embeddings": True, "eos_token_id": tokenizer.eos_token_id}
    QwenForCausalLM.from_config(config, seed=0).save_pretrained(str(path), tokenizer)
    return str(path), tokenizer


def _texts(tokenizer) -> list[str]:
    examples = synthetic.generate_synthetic(6, seed=11, cfg=synthetic_task(DataConfig(), 96))
    prompts = [template.render_prompt(tokenizer, ex.document, ex.question).text for ex in examples]
    responses = [ex.extra["reasoning"] for ex in examples if "reasoning" in ex.extra]
    return prompts + responses + ["<think>\nThe vault code is 4821, so 4821 + 17 = 4838.\n</think>\n"
                                  "Therefore, the answer is 4838.", "Zahl: 12,5 % — naïve café 3.1415"]


def _same_ids(reference, other, texts):
    for text in texts:
        want = reference.encode(text, add_special_tokens=False)
        got = other.encode(text, add_special_tokens=False)
        assert got == want, f"{type(other).__name__} ids differ for {text[:60]!r}: {len(got)} vs {len(want)} ids"
    assert other.eos_token_id == reference.eos_token_id
    assert other.pad_token_id == reference.pad_token_id


def test_transformers_autotokenizer_gives_qlfast_ids(exported):
    from transformers import AutoTokenizer

    path, trained = exported
    ours = tok.load_tokenizer(path)
    auto = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = _texts(ours)
    _same_ids(ours, auto, texts)
    _same_ids(trained, ours, texts)
    # the chat template renders identically, and the think tags survive skip_special_tokens decoding
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    assert auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == template.apply_chat(
        ours, "What is 12 + 30?")
    ids = ours.encode(texts[-2], add_special_tokens=False)
    assert auto.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True) == texts[-2]


def test_vllm_tokenizer_gives_qlfast_ids(exported):
    pytest.importorskip("vllm")
    from vllm.tokenizers import get_tokenizer

    path, _ = exported
    ours = tok.load_tokenizer(path)
    _same_ids(ours, get_tokenizer(path), _texts(ours))
