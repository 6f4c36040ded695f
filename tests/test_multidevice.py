"""Models dispatched by accelerate (`device_map`, CPU / disk offload) patch and generate exactly like the same model in
one piece. Only CPU devices exist here: "auto", explicit maps, disk offload and accelerate's cpu_offload hooks."""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload
from tiny_models import structured_ids, tiny_model, weights_config
from transformers import AutoModelForCausalLM

from hf_svdkv import LLaMAModelLoader, SVDBases, SVDCompressedCache, patch_model, unpatch_model

CONFIG = weights_config(key_rank=12, value_rank=20)
LAYERS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    """A tiny Llama saved to disk, and the same model in one piece."""
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32, num_layers=LAYERS)
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    return str(directory), model


@pytest.fixture(scope="module")
def reference(saved) -> dict[str, torch.Tensor]:
    """Greedy tokens of the model in one piece: unpatched, and patched with CONFIG (with and without a window)."""
    _, model = saved
    ids = structured_ids(20)
    out = {}
    with torch.no_grad():
        out["plain"] = model.generate(ids, max_new_tokens=12, do_sample=False)
        for window in (0, 4):
            patch_model(model, CONFIG, window=window)
            out[f"patched-w{window}"] = model.generate(ids, max_new_tokens=12, do_sample=False)
            unpatch_model(model)
    out["bases"] = SVDBases.from_model(model, CONFIG)
    return out


def offloaded_map(layers_on_disk: set[int]) -> dict[str, str]:
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    device_map.update({f"model.layers.{i}": "disk" if i in layers_on_disk else "cpu" for i in range(LAYERS)})
    return device_map


def load(directory: str, device_map: str | dict, tmp_path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        directory, device_map=device_map, offload_folder=str(tmp_path / "offload"), attn_implementation="sdpa"
    ).eval()


def generate(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(structured_ids(20), max_new_tokens=12, do_sample=False, **kwargs)


@pytest.mark.parametrize(
    "device_map",
    [
        "auto",
        pytest.param(offloaded_map({1}), id="layer1-on-disk"),
        pytest.param(offloaded_map({0, 1, 2}), id="all-on-disk"),
    ],
)
def test_device_map_generates_like_the_model_in_one_piece(saved, reference, device_map, tmp_path):
    model = load(saved[0], device_map, tmp_path)
    offloaded = model.model.layers[1].self_attn.k_proj.weight.device.type == "meta"
    assert offloaded == isinstance(device_map, dict)
    assert torch.equal(generate(model), reference["plain"])

    patch_model(model, CONFIG)  # bases fitted from weights accelerate keeps on disk
    assert model.model.layers[1].self_attn.k_proj.weight.device.type == (
        "meta" if offloaded else model.device.type
    )  # offloaded again
    for mine, theirs in zip(model._hf_svdkv_patch.settings.bases.layers, reference["bases"].layers, strict=True):
        torch.testing.assert_close(mine.key.down @ mine.key.up, theirs.key.down @ theirs.key.up, atol=1e-5, rtol=0)
    with torch.no_grad():
        result = model.generate(structured_ids(20), max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(result.sequences, reference["patched-w0"])
    cache = result.past_key_values
    assert isinstance(cache, SVDCompressedCache)
    for layer in cache.layers:  # bases and latents live where the layer runs (the GPU, where there is one)
        assert layer.keys.device.type == layer.projection.key.down.device.type == model.device.type

    patch_model(model, bases=reference["bases"], window=4)  # precomputed bases are validated against offloaded weights
    assert torch.equal(generate(model), reference["patched-w4"])
    unpatch_model(model)
    assert torch.equal(generate(model), reference["plain"])


def test_accelerate_cpu_offload_hooks(saved, reference, tmp_path):
    model = load(saved[0], None, tmp_path)
    cpu_offload(model, execution_device=torch.device("cpu"))  # every weight behind a hook, `meta` in the module
    assert model.model.layers[0].self_attn.v_proj.weight.device.type == "meta"
    patch_model(model, CONFIG)
    assert torch.equal(generate(model), reference["patched-w0"])
    loader = LLaMAModelLoader(model=model, tokenizer=object())  # the seed loader reads offloaded weights too
    assert torch.equal(loader.get_attention_weights(2)["v_proj"], saved[1].model.layers[2].self_attn.v_proj.weight)
    assert model.model.layers[2].self_attn.v_proj.weight.device.type == "meta"
    assert torch.equal(generate(model, cache_implementation="dynamic"), reference["plain"])


def test_layers_offloaded_as_blocks(saved, reference, tmp_path):
    """With `preload_module_classes` a whole decoder layer is one offloaded block: its hook loads every weight of
    the layer at once (the k/v weights are then read through the layer's hook)."""
    from accelerate import dispatch_model

    model = load(saved[0], None, tmp_path)
    device_map = offloaded_map({0, 2})
    device_map["lm_head"] = "cpu"
    dispatch_model(
        model, device_map, offload_dir=str(tmp_path / "blocks"), preload_module_classes=["LlamaDecoderLayer"]
    )
    layer = model.model.layers[2]
    assert layer._hf_hook.offload and layer.self_attn.k_proj.weight.device.type == "meta"
    patch_model(model, CONFIG)
    assert layer.self_attn.k_proj.weight.device.type == "meta"
    assert torch.equal(generate(model), reference["patched-w0"])
    patch_model(model, CONFIG, window=4)
    assert torch.equal(generate(model), reference["patched-w4"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU)")
def test_layers_split_between_cuda_and_cpu(saved, reference, tmp_path):
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.layers.2": 0,
        "model.norm": 0,
        "lm_head": 0,
    }
    model = load(saved[0], device_map, tmp_path)
    patch_model(model, CONFIG)
    with torch.no_grad():
        result = model.generate(
            structured_ids(20).to(0), max_new_tokens=12, do_sample=False, return_dict_in_generate=True
        )
    assert torch.equal(result.sequences.cpu(), reference["patched-w0"])
    # With a GPU, accelerate runs a layer mapped to "cpu" on the GPU (its weights are offloaded to CPU memory).
    assert model.model.layers[1].self_attn.k_proj.weight.device.type == "meta"
    for layer in result.past_key_values.layers:  # bases and latents live where the layer runs
        assert layer.keys.device.type == layer.projection.key.down.device.type == layer.positions.device.type == "cuda"
    patch_model(model, CONFIG, window=4)
    assert torch.equal(generate_on(model, 0), reference["patched-w4"])


def generate_on(model: torch.nn.Module, device: int | str) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(structured_ids(20).to(device), max_new_tokens=12, do_sample=False).cpu()
