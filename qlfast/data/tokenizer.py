"""A small byte-level BPE tokenizer trained locally on synthetic text, for the tiny preset.

Nothing is downloaded: the tokenizer is trained with the `tokenizers` library on `qlfast.data.synthetic.corpus`
(closed vocabulary, so every word becomes one token at vocab ~1024) and saved as a transformers
`PreTrainedTokenizerFast` directory (tokenizer.json + tokenizer_config.json with a Qwen-style chat template),
which transformers' AutoTokenizer and vLLM load from a model directory.

Normalisation and pre-tokenisation are Qwen2's own (NFC, then Qwen2Tokenizer's split regex: one token per digit,
then byte-level). That is not a style choice: next to a config.json with model_type qwen2, transformers'
AutoTokenizer (and vLLM, which calls it) builds `Qwen2Tokenizer`, which takes the vocabulary and merges from
tokenizer.json but installs Qwen2's normaliser and pre-tokeniser whatever the file says. A tokenizer trained with
any other pre-tokeniser gives different ids for the same text there than in qlfast (numbers split differently),
so an exported model would be evaluated on inputs it never saw. With Qwen2's rules the ids agree in all three
(tests/test_tokenizer_export.py).

Special tokens (ids 0..2, in this order): <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos, ends a turn).
<think> and </think> (ids 3, 4) are added tokens but *not* special: decoding with skip_special_tokens=True
(vLLM's default) must keep them, since the reward looks for the last </think>.

Byte-level BPE round-trips any text exactly (decode(encode(s)) == s), which keeps rewards and the trainer's
token bookkeeping consistent with what vLLM returns. Training is deterministic for fixed settings; results are
cached under a directory named by a hash of the settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX (the same as tiktoken's cl100k split, digits one at a time)
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                     r"|\s+(?!\S)|\s+")
_VERSION = 3  # bump when the training recipe changes, to invalidate caches


def _settings_hash(vocab_size: int, seed: int, n_docs: int) -> str:
    blob = json.dumps({"v": _VERSION, "vocab": vocab_size, "seed": seed, "n": n_docs, "tpl": CHAT_TEMPLATE})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("QLFAST_CACHE", os.path.expanduser("~/.cache/qlfast")), "tokenizers")


def train_tokenizer_object(texts: list[str], vocab_size: int = 1024):
    """Train a byte-level BPE `tokenizers.Tokenizer` on `texts` (deterministic for fixed input)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # Qwen2Tokenizer's normaliser and pre-tokeniser (see the module docstring for why they must be these)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS) + list(THINK_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Re-register so the think tags are matched before BPE but survive skip_special_tokens decoding.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def build_tokenizer(vocab_size: int = 1024, seed: int = 0, n_docs: int = 400, cache_dir: str | None = None) -> str:
    """Train (or reuse from the cache) the tiny tokenizer; returns its directory (loadable by AutoTokenizer)."""
    from transformers import PreTrainedTokenizerFast

    from qlfast.data.synthetic import corpus

    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"bpe{vocab_size}-{_settings_hash(vocab_size, seed, n_docs)}")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    # The chat roles join the corpus so that they are single tokens too.
    roles = ["system\nuser\nassistant\n"] * 4
    tok = train_tokenizer_object(corpus(seed=seed, n=n_docs) + roles, vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-")
    try:
        fast.save_pretrained(tmp)
        # transformers 5 writes its own class name; the v4 alias loads in both major versions.
        cfg_path = os.path.join(tmp, "tokenizer_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
        try:
            os.rename(tmp, path)  # atomic: concurrent builders race, the first rename wins
        except OSError:
            if not os.path.exists(os.path.join(path, "tokenizer.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_tokenizer(src_dir: str, model_dir: str) -> None:
    """Copy a built tokenizer's files into a model directory (next to config.json / safetensors)."""
    os.makedirs(model_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(model_dir, name))


def load_tokenizer(path: str):
    """The tokenizer of a local directory (no network).

    A directory saved by this module (tokenizer_class PreTrainedTokenizerFast) loads as exactly that class: next to a
    config.json with model_type qwen2, transformers' AutoTokenizer would build Qwen2Tokenizer with Qwen's own
    pre-tokenizer (digits split one by one) over our vocabulary, so the same text would get different token ids than
    in training. Any other tokenizer (a real Qwen model's) goes through AutoTokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cls = json.load(f).get("tokenizer_class")
        if cls in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
