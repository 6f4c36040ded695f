"""Edge cases: 16-bit models and long generations, empty prompts, running past the model's max positions, damaged or
foreign bases files, a cache carried across `generate` calls, and autograd modes. Each is right or a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import structured_ids, tiny_model, weights_config
from transformers import DynamicCache

from hf_svdkv import (
    BasesMismatchError,
    CompressedAutoregressiveDecoder,
    InferenceConfig,
    LLaMAFullForward,
    LLaMAModelLoader,
    ModelConfig,
    SVDBases,
    SVDCompressedCache,
    patch_model,
    unpatch_model,
)

pytest_plugins = ["fixtures_real"]
FULL_RANK = weights_config(key_rank=32, value_rank=32)  # head_dim 32: exact
REDUCED = weights_config(key_rank=16, value_rank=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(model, ids: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)


# --- dtypes -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_models_store_latents_in_their_dtype_and_bases_in_fp32(dtype):
    model = tiny_model("llama", dtype=dtype)
    with torch.no_grad():
        expected = model(structured_ids(24)).logits.float()
    patch_model(model, FULL_RANK)
    bases = model._hf_svdkv_patch.settings.bases
    assert all(
        t.dtype == torch.float32
        for layer in bases.layers
        for p in (layer.key, layer.value)
        for t in (p.down, p.up, p.center)
    )
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        logits = model(structured_ids(24), past_key_values=cache).logits.float()
    for layer in cache.layers:
        assert layer.keys.dtype == layer.values.dtype == dtype  # latents: model dtype
        assert layer.projection.key.down.dtype == layer.projection.value.up.dtype == torch.float32  # projections: fp32
    # Full rank in 16 bits: the latents are rounded once, like a 16-bit DynamicCache rounds its keys once.
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


def test_4k_token_bf16_generation_stays_finite():
    model = tiny_model("llama", dtype=torch.bfloat16)  # max_position_embeddings 512: this runs 8x past it too
    patch_model(model, REDUCED)
    prompt = structured_ids(4096 - 64)
    out = greedy(model, prompt, 64, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 4096)
    assert torch.isfinite(torch.stack(out.logits).float()).all()
    cache = out.past_key_values
    assert cache.get_seq_length() == 4095 and cache.layers[0].keys.dtype == torch.bfloat16
    assert all(
        torch.isfinite(layer.keys.read()).all() and torch.isfinite(layer.values.read()).all() for layer in cache.layers
    )
    with torch.no_grad():  # the same 4096 tokens in one prefill: finite too
        logits = model(out.sequences[:, :-1], past_key_values=SVDCompressedCache(model)).logits
    assert torch.isfinite(logits.float()).all()


# --- prompts and lengths ----------------------------------------------------------------------------------------------
def test_empty_prompt_is_a_clear_error():
    model = patch_model(tiny_model("llama"), REDUCED)
    empty = torch.zeros((1, 0), dtype=torch.long)
    with pytest.raises(ValueError, match="the input has no tokens \\(an empty prompt\\?\\).*BOS"):
        greedy(model, empty, 3)
    with pytest.raises(ValueError, match="the input has no tokens"):
        model(empty, past_key_values=SVDCompressedCache(model))


def test_empty_text_prompt_starts_from_bos(default_model):
    model, tokenizer = default_model
    loader = LLaMAModelLoader(ModelConfig(dtype="float32"), model=model, tokenizer=tokenizer)
    decoder = CompressedAutoregressiveDecoder(InferenceConfig(max_sequence_length=32, temperature=0.0), loader)
    result = decoder.generate("", max_new_tokens=4)
    assert result.prompt_tokens == 1 and 0 < len(result.tokens) <= 4 and result.text  # from the BOS token
    both = decoder.generate(["", "Hello"], max_new_tokens=4)
    assert both[0].prompt_tokens == both[1].prompt_tokens == 1 and both[0].tokens == result.tokens
    with pytest.raises(ValueError, match="input_ids has no tokens"):
        LLaMAFullForward(loader).forward(torch.zeros(0, dtype=torch.long))


def test_generation_past_max_positions_matches_the_uncompressed_model():
    model = tiny_model("llama")
    prompt = structured_ids(model.config.max_position_embeddings - 10)
    expected = greedy(model, prompt, 40)
    patch_model(model, FULL_RANK)
    assert torch.equal(greedy(model, prompt, 40), expected)
    patch_model(model, REDUCED, window=8)
    out = greedy(model, prompt, 40, return_dict_in_generate=True)
    assert out.past_key_values.layers[0].positions.max().item() == model.config.max_position_embeddings + 28


# --- bases files ------------------------------------------------------------------------------------------------------
@pytest.fixture()
def bases_file(tmp_path):
    model = tiny_model("llama")
    path = SVDBases.from_model(model, REDUCED).save_pretrained(tmp_path / "ok")
    return model, path


def write(tmp_path, name: str, data: bytes) -> str:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "bases.safetensors").write_bytes(data)
    return str(directory)


def test_truncated_bases_files(bases_file, tmp_path):
    _, path = bases_file
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for cut in (0, 4, 8, header_end // 2, header_end, header_end + 1, len(raw) // 2, len(raw) - 1):
        with pytest.raises(
            ValueError, match="is corrupted or not a safetensors file: Error while deserializing header"
        ):
            SVDBases.from_pretrained(write(tmp_path, f"cut{cut}", raw[:cut]))


def test_tampered_bases_files(bases_file, tmp_path):
    model, path = bases_file
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for where in (header_end + 5, len(raw) - 3):  # a flipped bit in the tensor data
        flipped = bytearray(raw)
        flipped[where] ^= 0x10
        with pytest.raises(ValueError, match="was modified after it was written: its checksum does not match"):
            SVDBases.from_pretrained(write(tmp_path, f"flip{where}", bytes(flipped)))

    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        header = json.loads(handle.metadata()["hf_svdkv"])

    def edited(name: str, change) -> str:
        new = json.loads(json.dumps(header))
        change(new)
        directory = tmp_path / name
        directory.mkdir()
        save_file(tensors, str(directory / "bases.safetensors"), metadata={"hf_svdkv": json.dumps(new)})
        return str(directory)

    cases = [
        ("no-geometry", lambda h: h.pop("geometry"), "malformed header \\(KeyError"),
        ("odd-geometry", lambda h: h["geometry"].update(rope="x"), "malformed header \\(TypeError"),
        ("group-size", lambda h: h.update(group_size=2), "tensors do not fit the header's geometry and group_size"),
        ("kv-heads", lambda h: h["geometry"].update(num_kv_heads=4), "tensors do not fit the header's geometry"),
        ("layers", lambda h: h["geometry"].update(num_layers=3), "lacks tensor 'layers.2.key.down'"),
        ("checksum", lambda h: h.pop("sha256"), "checksum does not match"),
    ]
    for name, change, message in cases:
        with pytest.raises(ValueError, match=message):
            SVDBases.from_pretrained(edited(name, change))
    # A header that still fits its tensors, for the same model: loads and works.
    patch_model(model, bases=SVDBases.from_pretrained(edited("method", lambda h: h.update(method="weights"))))


def test_bases_for_another_model(bases_file):
    model, path = bases_file
    bases = SVDBases.from_pretrained(path.parent)
    cases = [
        (tiny_model("llama", seed=5), "layer \\d W_[kv] differs by .* from the weights the bases were computed on"),
        (tiny_model("qwen2"), "bases were computed for a model with model_type=llama, this model has qwen2"),
        (tiny_model("llama", num_layers=3), "num_layers=2, this model has 3"),
        (tiny_model("llama", head_dim=16), "num_heads|head_dim=32, this model has 16"),
    ]
    for other, message in cases:
        with pytest.raises(BasesMismatchError, match=message):
            patch_model(other, bases=bases)
    # A cache built from another model's bases, handed to generate().
    other = patch_model(tiny_model("llama", seed=5), REDUCED)
    with pytest.raises(BasesMismatchError, match="do not match the cache's bases"):
        greedy(other, structured_ids(8), 2, past_key_values=SVDCompressedCache(bases=bases))
    patch_model(model, bases=bases)  # the right model takes them


# --- one cache, several generate() calls ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [FULL_RANK, REDUCED, weights_config(key_rank=16, value_rank=16, window=4)],
    ids=["full-rank", "reduced", "window"],
)
def test_cache_reused_to_continue_a_conversation(config):
    model = tiny_model("llama")
    first, reply = structured_ids(20), structured_ids(6, seed=3)

    def conversation(cache) -> tuple[torch.Tensor, torch.Tensor]:
        turn1 = greedy(model, first, 8, past_key_values=cache)
        turn2 = greedy(model, torch.cat([turn1, reply], dim=1), 8, past_key_values=cache)
        return turn1, turn2

    if config is FULL_RANK:  # exact: the same conversation as with a DynamicCache
        expected = conversation(DynamicCache(config=model.config))
    patch_model(model, config)
    cache = SVDCompressedCache(model)
    turn1, turn2 = conversation(cache)
    assert cache.get_seq_length() == turn2.shape[1] - 1  # every token but the last generated one
    assert torch.equal(turn2[:, : turn1.shape[1]], turn1)
    # The second call only prefilled the new tokens, and reads the same as one generate() over the whole text.
    assert torch.equal(turn2, greedy(model, torch.cat([turn1, reply], dim=1), 8))
    if config is FULL_RANK:
        assert torch.equal(turn1, expected[0]) and torch.equal(turn2, expected[1])


# --- autograd modes ---------------------------------------------------------------------------------------------------
def test_inference_mode_no_grad_and_grad():
    model = tiny_model("llama")
    ids = structured_ids(16)
    with torch.inference_mode():  # bases made here are inference tensors
        patch_model(model, REDUCED)
        in_inference = model.generate(ids, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        in_no_grad = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(in_inference, in_no_grad)

    cache = SVDCompressedCache(model)
    with torch.inference_mode():
        model(ids, past_key_values=cache)
    with torch.no_grad():  # a cache filled under inference_mode continues under no_grad...
        step = model(ids[:, :1], past_key_values=cache).logits
    model.train()
    out = model(ids[:, :3], past_key_values=cache)  # ...and with autograd on: gradients reach the weights
    out.logits.sum().backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None
    assert torch.isfinite(step).all()
    unpatch_model(model.eval())
