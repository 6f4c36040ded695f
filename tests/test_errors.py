"""Every bad input gets an error that names the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import structured_ids, tiny_model, weights_config
from transformers import GPT2Config, GPT2LMHeadModel

from hf_svdkv import (
    BasesMismatchError,
    CompressionConfig,
    SVDBases,
    SVDCompressedCache,
    UnsupportedModelError,
    patch_model,
)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(key_rank=0, value_rank=8), "key_rank must be positive"),
        (dict(key_rank=8, value_rank=-1), "value_rank must be positive"),
        (dict(key_rank=8.5, value_rank=8), "key_rank must be an integer"),
        (dict(key_rank="8", value_rank=8), "key_rank must be an integer"),
        (dict(key_rank=8), "give both key_rank and value_rank, a profile"),
        (dict(profile="ultra"), "unknown profile 'ultra'"),
        (dict(profile="med", group_size=0), "group_size must be a positive integer"),
        (dict(profile="med", method="magic"), "unknown method 'magic'"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**kwargs)


def test_ranks_checked_against_the_model():
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match="key_rank=33 exceeds head_dim=32"):
        patch_model(model, weights_config(key_rank=33, value_rank=8))
    with pytest.raises(ValueError, match="value_rank=40 exceeds head_dim=32: a group of 2"):
        patch_model(model, weights_config(key_rank=8, value_rank=40, group_size=2))
    with pytest.raises(ValueError, match="group_size 3 does not divide the model's 2 KV heads"):
        patch_model(model, weights_config(key_rank=8, value_rank=8, group_size=3))
    with pytest.raises(ValueError, match="not both"):
        patch_model(
            model,
            weights_config(key_rank=8, value_rank=8),
            bases=SVDBases.from_model(model, weights_config(key_rank=8, value_rank=8)),
        )
    # A tiny random model has no tokenizer to calibrate with: the default (calibrated) config says what to pass.
    with pytest.raises(ValueError, match="needs a tokenizer.*pass tokenizer="):
        patch_model(model)


def test_unsupported_architecture():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'.*not supported.*llama, mistral, qwen2"):
        patch_model(model, weights_config(profile="low"))


def test_cache_on_unpatched_model_raises():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs a model patched with hf_svdkv.patch_model"):
        SVDCompressedCache(model)
    cache = SVDCompressedCache(bases=SVDBases.from_model(model, weights_config(key_rank=8, value_rank=8)))
    with pytest.raises(RuntimeError, match="attention layer hf_svdkv has not patched \\(layer 0\\).*patch_model"):
        model(structured_ids(8), past_key_values=cache)
    with pytest.raises(RuntimeError, match="not patched"):
        model.generate(structured_ids(8), past_key_values=SVDCompressedCache(bases=cache.bases), max_new_tokens=2)


def test_bases_for_another_model_are_refused(tmp_path):
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    config = weights_config(key_rank=8, value_rank=8)
    with pytest.raises(BasesMismatchError, match=r"layer \d+ W_[kv] differs by .*another checkpoint"):
        patch_model(model, bases=SVDBases.from_model(other, config))
    wider = tiny_model("llama", num_heads=4, num_kv_heads=4)
    with pytest.raises(BasesMismatchError, match="num_kv_heads=4, this model has 2"):
        patch_model(model, bases=SVDBases.from_model(wider, config))
    # A cache built for another model, handed to a patched one.
    patch_model(model, config)
    foreign = SVDCompressedCache(bases=SVDBases.from_model(other, config))
    with pytest.raises(BasesMismatchError, match="do not match the cache's bases"):
        model(structured_ids(8), past_key_values=foreign)


def test_corrupted_and_tampered_bases_files(tmp_path):
    model = tiny_model("llama")
    path = SVDBases.from_model(model, weights_config(key_rank=8, value_rank=8)).save_pretrained(tmp_path / "ok")

    with pytest.raises(FileNotFoundError, match="no bases at"):
        SVDBases.from_pretrained(tmp_path / "missing")

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / path.name).write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupted or not a safetensors file"):
        SVDBases.from_pretrained(truncated)

    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    tensors["layers.0.key.down"] = tensors["layers.0.key.down"] * 1.01
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    save_file(tensors, str(tampered / path.name), metadata=metadata)
    with pytest.raises(ValueError, match="modified after it was written"):
        SVDBases.from_pretrained(tampered)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"x": torch.zeros(2)}, str(foreign / path.name))
    with pytest.raises(ValueError, match="without hf_svdkv metadata"):
        SVDBases.from_pretrained(foreign)

    header = json.loads(metadata["hf_svdkv"])
    header["format_version"] = 99
    future = tmp_path / "future"
    future.mkdir()
    save_file(tensors, str(future / path.name), metadata={"hf_svdkv": json.dumps(header)})
    with pytest.raises(ValueError, match="bases format 99"):
        SVDBases.from_pretrained(future)
