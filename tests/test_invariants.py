"""What must hold for every way of storing a cache: one test per invariant, run on every row of `CACHE_VARIANTS`
(kvpress's `default_presses` idiom). A new storage format is a new row there, not a new copy of these tests."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CACHE_VARIANTS, assert_left_padded_rows_equal_single_runs, left_padded, structured_ids
from transformers import DynamicCache

import hf_svdkv.attention
import hf_svdkv.decode
import hf_svdkv.decode.state
import hf_svdkv.decode.window
from hf_svdkv import SVDCompressedCache
from hf_svdkv.decode.blockwise import BlockwiseBackend
from hf_svdkv.decode.cpu import CpuKernelBackend

VARIANTS = list(CACHE_VARIANTS)
ATOL = 1e-4


def atol_across_paths(variant: str) -> float:
    """The tolerance on logits of two paths that round differently in float32 and store what they compute. With
    integer latents a value within rounding of a code boundary (an 8-bit step is under 1% of a group's range) or a
    scale within rounding of a float16 boundary is stored one step apart by the two paths: 1e-4 in these tiny models'
    logits when it happens (seen on the mixed-precision variant). A wrong mask, token or position moves them by 1e-2
    or more."""
    return ATOL if CACHE_VARIANTS[variant].latent_bits is None else 1e-3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_forward_of_many_tokens_equals_them_one_by_one(variant, attn):
    """After a prompt, new tokens give the same logits whether fed in one forward or decoded one at a time (and,
    where the prompt is read back from its latents too, whether the prompt came in the same forward or not)."""
    model = CACHE_VARIANTS[variant].model(attn)
    ids = structured_ids(40)
    with torch.no_grad():
        cache = SVDCompressedCache(model)
        together = torch.cat(
            [model(ids[:, :10], past_key_values=cache).logits, model(ids[:, 10:], past_key_values=cache).logits], dim=1
        )
        cache = SVDCompressedCache(model)
        one_by_one = [model(ids[:, :10], past_key_values=cache).logits]
        one_by_one += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(10, 40)]
        torch.testing.assert_close(torch.cat(one_by_one, dim=1), together, atol=ATOL, rtol=0)
        if not CACHE_VARIANTS[variant].exact_prefill:
            one_pass = model(ids, past_key_values=SVDCompressedCache(model)).logits
            torch.testing.assert_close(one_pass, together, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_rows_equal_single_runs(variant):
    assert_left_padded_rows_equal_single_runs(CACHE_VARIANTS[variant].model(), (5, 13, 18), new_tokens=8)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_latent_path_equals_reference_path(variant, attn, monkeypatch):
    """Chunks of a prefill, a token, a teacher-forced continuation, in blocks far smaller than the cache (so the
    running softmax spans many of them), against the same forwards with every key and value rebuilt at full size and
    the model's attention backend run on them; a left-padded batch."""
    model = CACHE_VARIANTS[variant].model(attn)
    ids, mask = left_padded((90, 79))

    def run() -> torch.Tensor:
        cache = SVDCompressedCache(model)
        with torch.no_grad():
            chunks = [
                model(ids[:, s:e], attention_mask=mask[:, :e], past_key_values=cache).logits
                for s, e in ((0, 40), (40, 70), (70, 71), (71, 90))
            ]
        return torch.cat(chunks, dim=1)

    monkeypatch.setattr(hf_svdkv.decode.window, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(hf_svdkv.decode, "BACKENDS", [BlockwiseBackend()])
    latent = run()
    monkeypatch.setattr(hf_svdkv.attention, "MAX_QUERY_LEN", 0)
    reference = run()
    valid = mask.bool()
    torch.testing.assert_close(latent[valid], reference[valid], atol=atol_across_paths(variant), rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_value_up_projection_folded_into_o_proj_or_not_gives_the_same_logits(variant, monkeypatch):
    """Whether o_proj is folded onto the value latents (`folding_pays`) decides memory and speed, never the result:
    a chunked prefill and decoding steps of a left-padded batch, both ways."""
    model = CACHE_VARIANTS[variant].model()
    ids, mask = left_padded((30, 21))

    def run(fold: bool) -> torch.Tensor:
        monkeypatch.setattr(hf_svdkv.decode.state, "folding_pays", lambda *args: fold)
        cache, logits = SVDCompressedCache(model), []
        with torch.no_grad():
            for s, e in ((0, 20), (20, 30)):
                logits.append(model(ids[:, s:e], attention_mask=mask[:, :e], past_key_values=cache).logits)
            step_mask = mask
            for t in range(3):  # the same tokens both ways (greedy ones could part on a near tie)
                step_mask = torch.cat([step_mask, step_mask.new_ones(2, 1)], dim=1)
                logits.append(model(ids[:, t : t + 1], attention_mask=step_mask, past_key_values=cache).logits)
        return torch.cat(logits, dim=1)

    folded, unfolded = run(True), run(False)
    valid = torch.cat([mask, mask.new_ones(2, 3)], dim=1).bool()
    torch.testing.assert_close(unfolded[valid], folded[valid], atol=atol_across_paths(variant), rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_equal_the_torch_path(variant, monkeypatch):
    """Decoding steps through each fused kernel this machine runs (the Triton kernel: tests/test_triton_decode.py,
    under its interpreter) against the torch path, on a left-padded batch longer than one of the kernel's spans."""
    from hf_svdkv.decode import cpu

    if not cpu.available():
        pytest.skip("no C++ compiler: the CPU kernel cannot be built")
    model = CACHE_VARIANTS[variant].model()
    kernel = CpuKernelBackend()
    served = []
    supports = kernel.supports
    monkeypatch.setattr(kernel, "supports", lambda *a: served.append(supports(*a)) or served[-1])
    ids, mask = left_padded((cpu.SPAN + 90, 40))

    def decode(backends: list) -> torch.Tensor:
        monkeypatch.setattr(hf_svdkv.decode, "BACKENDS", backends)
        cache, step_mask, logits = SVDCompressedCache(model), mask, []
        with torch.inference_mode():
            out = model(ids, attention_mask=step_mask, past_key_values=cache)
            for _ in range(5):
                step_mask = torch.cat([step_mask, step_mask.new_ones(2, 1)], dim=1)
                out = model(out.logits[:, -1:].argmax(-1), attention_mask=step_mask, past_key_values=cache)
                logits.append(out.logits)
        return torch.cat(logits, dim=1)

    expected = decode([BlockwiseBackend()])
    got = decode([kernel, BlockwiseBackend()])
    if not any(served):
        pytest.skip(f"the CPU kernel does not read {variant} latents")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if CACHE_VARIANTS[v].latent_bits is None])
def test_full_rank_equals_dynamic_cache(variant):
    """With bases of full rank the compressed cache is DynamicCache: float32 logits within 1e-4 and the same greedy
    tokens, on a left-padded batch (integer latents are lossy at any rank: their own tests bound the error)."""
    model = CACHE_VARIANTS[variant].model(full_rank=True)
    ids, mask = left_padded((9, 20))
    outputs = {}
    with torch.no_grad():
        for name, cache in (("dynamic", DynamicCache(config=model.config)), ("svd", SVDCompressedCache(model))):
            outputs[name] = model.generate(
                ids,
                attention_mask=mask,
                past_key_values=cache,
                max_new_tokens=10,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
    assert torch.equal(outputs["svd"].sequences, outputs["dynamic"].sequences)
    for got, expected in zip(outputs["svd"].logits, outputs["dynamic"].logits, strict=True):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
