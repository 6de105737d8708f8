"""The HF export (qlfast/trainer/build.py export -> qlfast/model/io.py save) loads right elsewhere (issue #17): the
weights in the compute dtype (--model.dtype), not the fp32 masters; config.json's `torch_dtype` (what transformers 4
and older vLLM read) and `dtype` agree with the tensors; a model loaded from a HF directory with
generation_config.json keeps it."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from qlfast.config import Config
from qlfast.trainer import build, precision
from qlfast.trainer.comm import Env

ENV = Env(0, 1, 0, torch.device("cpu"))


def _cfg(dtype: str, path: str = "") -> Config:
    cfg = Config()  # the tiny preset's sizes
    cfg.model.dtype, cfg.model.master_dtype, cfg.model.path = dtype, "float32", path
    cfg.model.attention_backend = "sdpa"
    return cfg


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    tokenizer, model = build.tokenizer_and_model(_cfg("float32"), torch.device("cpu"))
    path = tmp_path_factory.mktemp("fp32")
    build.export(model, str(path), tokenizer, ENV)
    return path


def test_bf16_compute_exports_bf16_and_says_so(fp32_export, tmp_path):
    tokenizer, model = build.tokenizer_and_model(_cfg("bfloat16"), torch.device("cpu"))
    assert {p.dtype for p in precision.trainable(model)} == {torch.float32}  # fp32 masters, as the trainer trains
    build.export(model, str(tmp_path), tokenizer, ENV)
    tensors = _tensors(tmp_path)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    ref = _tensors(fp32_export)
    assert tensors.keys() == ref.keys()
    for k, t in tensors.items():  # the same (seeded) weights, rounded to bf16
        assert torch.equal(t, ref[k].to(torch.bfloat16)), k
    ratio = os.path.getsize(tmp_path / "model.safetensors") / os.path.getsize(fp32_export / "model.safetensors")
    assert 0.49 < ratio < 0.52, ratio
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["torch_dtype"] == "bfloat16" and conf["dtype"] == "bfloat16"
    assert json.loads((fp32_export / "config.json").read_text())["torch_dtype"] == "float32"


def test_export_carries_the_sources_generation_config(fp32_export, tmp_path):
    gen = {"bos_token_id": 3, "eos_token_id": [3, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (fp32_export / "generation_config.json").write_text(json.dumps(gen, indent=2))
    try:
        tokenizer, model = build.tokenizer_and_model(_cfg("bfloat16", str(fp32_export)), torch.device("cpu"))
        out = tmp_path / "export"
        build.export(model, str(out), tokenizer, ENV)
    finally:
        (fp32_export / "generation_config.json").unlink()
    assert json.loads((out / "generation_config.json").read_text()) == gen
    assert {t.dtype for t in _tensors(out).values()} == {torch.bfloat16}
    # a model built from a config (no source directory) writes none, and none from the working directory
    tokenizer, model = build.tokenizer_and_model(_cfg("bfloat16"), torch.device("cpu"))
    build.export(model, str(tmp_path / "fresh"), tokenizer, ENV)
    assert not (tmp_path / "fresh" / "generation_config.json").exists()
