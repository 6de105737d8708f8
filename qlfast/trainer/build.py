"""Building what a run needs from its config: tokenizer, policy model, datasets binned into curriculum phases."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlfast.config import Config, DataConfig
from qlfast.data import docqa, synthetic, template
from qlfast.data import tokenizer as tok
from qlfast.model import ModelOptions, QwenForCausalLM
from qlfast.model.config import load_config
from qlfast.rl.curriculum import LengthBins, Phase, assign_bins
from qlfast.trainer import precision


def tokenizer_and_model(cfg: Config, device: torch.device):
    """The tokenizer and the policy: loaded from cfg.model.path, or (tiny preset) a locally trained tokenizer and a
    randomly initialised Qwen2 built from the config fields, identical on every rank (seeded).

    Parameters are built in model.master_dtype. Without FSDP a compute dtype below it gets a working copy with fp32
    masters (precision.attach); with FSDP a checkpoint is built on the meta device, and comm.shard_model(weights=path)
    fills each rank's shards."""
    m = cfg.model
    options = ModelOptions(attn_backend=m.attention_backend, checkpoint=m.checkpointing,
                           offload=m.offload_checkpoints, tiled_mlp=m.tiled_mlp)
    dtype, compute = precision.dtype(m.master_dtype), precision.dtype(m.dtype)
    if m.path:
        tokenizer = tok.load_tokenizer(m.path)
        if m.fsdp:  # never whole on a rank: comm.shard_model(weights=m.path) reads each rank's shards
            with torch.device("meta"):
                return tokenizer, QwenForCausalLM(load_config(m.path), options).to(dtype)
        model = QwenForCausalLM.from_pretrained(m.path, dtype=dtype, device=device, options=options)
        precision.attach(model, compute)
        return tokenizer, model
    tokenizer = tok.load_tokenizer(tok.build_tokenizer(cfg.data.tokenizer_vocab, seed=cfg.data.seed))
    # the vocabulary is padded to a multiple of 64, as Qwen's (and vLLM's own padding) are
    hf_config = {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": -(-len(tokenizer) // 64) * 64,
        "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "max_position_embeddings": m.max_position_embeddings, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "torch_dtype": m.dtype, "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "initializer_range": 0.02, "use_sliding_window": False,
    }
    model = QwenForCausalLM.from_config(hf_config, options, dtype=dtype, device=device, seed=cfg.train.seed)
    if not m.fsdp:  # under FSDP2 the mixed-precision policy casts instead (comm.shard_model)
        precision.attach(model, compute)
    return tokenizer, model


@dataclass
class Datasets:
    train: list[docqa.DocQAExample]
    heldout: list[docqa.DocQAExample]
    prompt_ids: list[list[int]]  # rendered, tokenised prompts of `train`
    heldout_prompt_ids: list[list[int]]
    bins: LengthBins
    skipped: list[str]
    sft: list[docqa.DocQAExample]  # warm-up SFT examples (with extra["reasoning"])
    sft_prompt_ids: list[list[int]]


def synthetic_task(data: DataConfig, doc_tokens: int) -> synthetic.SyntheticConfig:
    """The synthetic task of a DataConfig at one document length (documents of 80-100% of doc_tokens)."""
    return synthetic.SyntheticConfig(doc_tokens=(int(doc_tokens * 0.8), doc_tokens), n_facts=data.synthetic_facts,
                                     n_links=data.synthetic_links,
                                     attributes=synthetic.ATTRIBUTES[:data.synthetic_attributes])


def _synthetic(cfg: Config, n: int, seed: int) -> list[docqa.DocQAExample]:
    lengths = [int(x) for x in cfg.data.synthetic_doc_tokens.split(",") if x.strip()]
    if not lengths:
        raise ValueError("--data.synthetic_doc_tokens is empty and no --data.train_files were given")
    out = []
    per = [n // len(lengths) + (i < n % len(lengths)) for i in range(len(lengths))]
    for k, (length, count) in enumerate(zip(lengths, per)):
        out += synthetic.generate_synthetic(count, seed=seed * 100 + k, cfg=synthetic_task(cfg.data, length))
    return out


def datasets(cfg: Config, tokenizer, phases: list[Phase]) -> Datasets:
    skipped: list[str] = []
    if cfg.data.train_files:
        res = docqa.load_docqa(cfg.data.train_files.split(","), skip_bad=cfg.data.skip_bad_rows)
        train, skipped = res.examples, res.skipped
    else:
        train = _synthetic(cfg, cfg.data.synthetic_train, seed=cfg.data.seed)
    if cfg.data.eval_files:
        heldout = docqa.load_docqa(cfg.data.eval_files.split(","), skip_bad=cfg.data.skip_bad_rows).examples
    else:
        heldout = _synthetic(cfg, cfg.data.synthetic_eval, seed=cfg.data.seed + 7919)
    limit = max(p.max_prompt_tokens for p in phases)

    def render_all(examples, max_tokens=None):
        return [render(tokenizer, ex, max_tokens)[0] for ex in examples]

    train_ids = render_all(train)  # whole: a prompt longer than every phase is reported by the bins, not truncated
    heldout_ids = render_all(heldout, limit)
    bins = assign_bins([len(p) for p in train_ids], [p.max_prompt_tokens for p in phases])
    if cfg.sft.steps <= 0:
        sft_examples, sft_ids = [], []
    elif cfg.sft.data_files:
        sft_examples = docqa.load_docqa(cfg.sft.data_files.split(","), skip_bad=cfg.data.skip_bad_rows).examples
        sft_ids = render_all(sft_examples, limit)
    elif cfg.data.train_files:  # no separate SFT data: the RL rows, which must carry a worked response
        sft_examples, sft_ids = train, train_ids
    else:  # synthetic, disjoint from the RL questions (its own seed)
        sft_examples = _synthetic(cfg, cfg.data.synthetic_sft, seed=cfg.data.seed + 104729)
        sft_ids = render_all(sft_examples)
    return Datasets(train, heldout, train_ids, heldout_ids, bins, skipped, sft_examples, sft_ids)


def render(tokenizer, ex: docqa.DocQAExample, max_tokens: int | None = None) -> tuple[list[int], bool]:
    """The prompt of one example as the engine gets it, and whether it was middle-truncated: the one rendering of
    training, the held-out evaluation and `python -m qlfast.eval`.

    A templated row (document and question known) is rendered with the QwenLong-L1 template and only its document is
    middle-truncated (the question and instruction survive); a pre-rendered prompt that is not in the template is
    middle-truncated as a whole, as LongBench does. max_tokens=None never truncates."""
    if ex.document is not None and ex.question is not None:
        rp = template.render_prompt(tokenizer, ex.document, ex.question, max_tokens)
        return rp.input_ids, rp.truncated
    ids = tokenizer.encode(template.apply_chat(tokenizer, ex.user_prompt()), add_special_tokens=False)
    return (list(ids), False) if max_tokens is None else template.middle_truncate_ids(ids, max_tokens)


def export(model, path, tokenizer, env) -> None:
    """Write the model (HF layout) and tokenizer to `path`; collective under FSDP2 (the full weights are gathered).

    The weights are written in the compute dtype (--model.dtype), never as the fp32 masters: full_state_dict casts
    under FSDP2, and a replicated model's working copy is cast explicitly here."""
    if env.fsdp:
        from qlfast.model import io
        from qlfast.parallel.fsdp import full_state_dict

        full = full_state_dict(model)
        if env.is_main:
            io.save(model, path, tokenizer=tokenizer, state_dict=full)
    elif env.is_main:
        masters = precision.masters(model)
        model.save_pretrained(path, tokenizer, dtype=masters.compute if masters is not None else None)
