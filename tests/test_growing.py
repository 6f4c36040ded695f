"""Cache tensors grow in place (growing.append_along): same contents as concatenation, a copy only now and then,
spare room counted in the bytes held, and views handed out earlier never change."""

from __future__ import annotations

import torch
from tiny_models import structured_ids, tiny_model, weights_config

from hf_svdkv import SVDCompressedCache, patch_model
from hf_svdkv.growing import SPARE_FRACTION, append_along, held_nbytes


def test_appends_equal_concatenation_and_rarely_copy():
    stored, buffer, copies = torch.randn(2, 3, 1024, 8), None, 0
    expected = stored.clone()
    for step in range(300):
        new = torch.full((2, 3, 1, 8), float(step))
        before = buffer
        stored, buffer = append_along(buffer, stored, new)
        copies += buffer is not before
        expected = torch.cat([expected, new], dim=-2)
        assert torch.equal(stored, expected)
    # Spare room of 1/SPARE_FRACTION of the length (16 to 20 tokens here): one copy per 16 steps or fewer.
    assert copies <= 300 // 16 + 1
    assert held_nbytes(stored, buffer) <= stored.numel() * 4 * (1 + 1 / SPARE_FRACTION)


def test_earlier_views_never_change():
    stored, buffer = append_along(None, torch.zeros(1, 1, 0, 4), torch.ones(1, 1, 100, 4))
    stored, buffer = append_along(buffer, stored, torch.full((1, 1, 1, 4), 2.0))
    view = stored
    cropped = stored[..., :50, :]  # a crop is a prefix view: not the buffer's own view, so it gets a new buffer
    longer, _ = append_along(buffer, cropped, torch.full((1, 1, 1, 4), 3.0))
    assert torch.equal(view[..., 50, :], torch.ones(1, 1, 4)) and longer[..., 50, :].eq(3).all()


def test_decoding_keeps_latents_in_place_and_counts_their_buffer():
    model = tiny_model("llama")
    patch_model(model, weights_config(key_rank=8, value_rank=8))
    cache = SVDCompressedCache(model)
    with torch.inference_mode():
        out = model(structured_ids(200), past_key_values=cache)
        assert cache.nbytes() == cache.bytes_per_token() * 200  # a prefill gets an exact fit
        pointers = set()
        for _ in range(3):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
            pointers.add(cache.layers[0].keys.stored.data_ptr())
    layer = cache.layers[0]
    assert len(pointers) == 1  # 3 tokens fit in the spare room made by the first one
    spare = 200 // SPARE_FRACTION - 2
    latent_bytes = 2 * 8 * 4 * 2  # kv heads x rank x float32, keys and values
    assert layer.nbytes() == (203 + spare) * (latent_bytes + 4)
    cache.crop(-2)  # the next token must not write into what the earlier view shows
    view = layer.keys.stored
    with torch.inference_mode():
        model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
    assert layer.keys.stored.data_ptr() != view.data_ptr()
