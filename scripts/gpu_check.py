"""One self-contained GPU check of hf_svdkv's decode paths: correctness, then the timing of one attention step.

    python scripts/gpu_check.py --out $OUT          # < 3 minutes on an H100; no model download, no network

(a) correctness on CUDA: a tiny random Llama (GQA) at full rank, patched vs DynamicCache (float32 and bf16), and the
    Triton kernel vs the torch latent path vs the reference path (rebuild everything, RoPE, SDPA) on one layer;
(b) timing (CUDA events, warm-up, median) of one decode attention step of the default model's geometry (9 query
    heads, 3 KV heads, head_dim 64) at 8k and 32k tokens, batch 1 and 8: SDPA over a full bf16 cache vs the Triton
    kernel, the torch latent path and the reference path, for a 2x cache (per-head 32/32, joint 96/96).
Every section runs under its own try/except: a failure is recorded and the rest still runs. Prints markdown tables;
writes gpu_check.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

if "--dry-run" in sys.argv:  # Triton reads this when it is first imported, which transformers may do
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from hf_svdkv import CompressionConfig, SVDCompressedCache, patch_model  # noqa: E402
from hf_svdkv import latent_attention as la  # noqa: E402
from hf_svdkv.attention import apply_rope, compressed_attention_forward  # noqa: E402

RESULTS: dict = {"sections": {}, "errors": {}}
SECTIONS: list = []
# --dry-run: the same code on CPU (kernels in Triton's interpreter), tiny sizes, to catch script bugs without a GPU.
# Timing cases still pending after budget_s seconds are skipped (and listed under errors), to stay within 3 minutes.
RUN = {"device": "cuda", "contexts": (32768, 8192), "batches": (1, 8), "check_context": 5000, "model_tokens": 300,
       "max_iters": 1000, "budget_s": 170.0, "start": time.perf_counter()}
GEOMETRY = {"num_heads": 9, "num_kv_heads": 3, "head_dim": 64}  # SmolLM2-135M's attention
CONFIGS = {"per-head 32/32": CompressionConfig(key_rank=32, value_rank=32), "joint 96/96": CompressionConfig(key_rank=32, value_rank=32, group_size=3)}


def section(name: str):
    """Register a section; `run_sections` runs each in order, keeping its result or its traceback."""
    def register(fn):
        SECTIONS.append((name, fn))
        return fn
    return register


def run_sections() -> None:
    for name, fn in SECTIONS:
        start = time.perf_counter()
        try:
            RESULTS["sections"][name] = fn()
        except Exception:  # noqa: BLE001 - one failing section must not lose the others
            RESULTS["errors"][name] = traceback.format_exc()
            print(f"!! section {name} failed:\n{RESULTS['errors'][name]}", flush=True)
        if RUN["device"] == "cuda":
            torch.cuda.empty_cache()
        print(f"-- {name}: {time.perf_counter() - start:.1f}s", flush=True)
        write_json()  # after every section: a run cut short still leaves what it measured


def write_json() -> None:
    RESULTS["seconds"] = time.perf_counter() - RUN["start"]
    out = Path(RUN["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def tiny_llama(dtype: torch.dtype, layers: int = 2, hidden_per_head: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=GEOMETRY["num_heads"] * hidden_per_head, intermediate_size=1024,
        num_hidden_layers=layers, num_attention_heads=GEOMETRY["num_heads"],
        num_key_value_heads=GEOMETRY["num_kv_heads"], head_dim=GEOMETRY["head_dim"], max_position_embeddings=65536,
        initializer_range=0.08, tie_word_embeddings=False, pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(RUN["device"], dtype).eval()


def fast_forward(module, patch, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
    """The patched attention with the latent path wired in (as tests/test_latent_attention.py does), so this script
    exercises it whether or not attention.py already calls it."""
    batch, seq = hidden_states.shape[:-1]
    if not isinstance(past_key_values, SVDCompressedCache) or not la.use_latent_attention(module, past_key_values, seq):
        return compressed_attention_forward(module, patch, hidden_states, position_embeddings=position_embeddings,
                                            attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
    shape = (batch, seq, -1, module.head_dim)
    query = apply_rope(module.q_proj(hidden_states).view(shape).transpose(1, 2), *position_embeddings)
    key = module.k_proj(hidden_states).view(shape).transpose(1, 2)
    value = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    layer = past_key_values.layers[module.layer_idx]
    positions = kwargs["position_ids"].expand(batch, -1)
    out = la.latent_attention_forward(module, layer, patch.rotary_emb, query, key, value, positions, attention_mask,
                                      memo_key=position_embeddings[0])
    return out, None


def step_logits(model, ids, cache, mask=None, steps: int = 8) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache)
        logits = [out.logits[:, -1:]]
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(nxt, attention_mask=mask, past_key_values=cache)
            logits.append(out.logits)
    return torch.cat(logits, dim=1).float()


@section("model_full_rank")
def check_model() -> dict:
    """Patched (latent path, Triton on decode) vs DynamicCache at full rank: float32 exact, bf16 within rounding."""
    from transformers import DynamicCache

    import hf_svdkv.patch

    rows = {}
    ids = torch.randint(3, 256, (2, RUN["model_tokens"]), device=RUN["device"], generator=torch.Generator(RUN["device"]).manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding on row 1
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama(dtype)
        expected = step_logits(model, ids, DynamicCache(config=model.config), mask)
        for name, group in (("per-head", 1), ("joint", 3)):
            full = CompressionConfig(key_rank=64, value_rank=64, group_size=group)
            for wiring, forward in (("as-wired", compressed_attention_forward), ("latent", fast_forward)):
                original = hf_svdkv.patch.compressed_attention_forward
                hf_svdkv.patch.compressed_attention_forward = forward if wiring == "latent" else original
                try:
                    patch_model(model, full)
                    got = step_logits(model, ids, SVDCompressedCache(model), mask)
                finally:
                    hf_svdkv.patch.compressed_attention_forward = original
                diff = (got - expected).abs().max().item()
                same = bool((got.argmax(-1) == expected.argmax(-1)).all())
                rows[f"{str(dtype).removeprefix('torch.')} {name} {wiring}"] = {"max_abs_logit_diff": diff, "same_argmax": same}
        del model
    for key, value in rows.items():
        print(f"{key:32s} max|Δlogit| {value['max_abs_logit_diff']:.2e}  same argmax: {value['same_argmax']}")
    return rows


def filled_layer(config: CompressionConfig, dtype: torch.dtype, batch: int, context: int, pad: int = 0):
    """A 1-layer model of the default geometry, patched with `config`, its cache layer holding `context` random tokens."""
    model = tiny_llama(dtype, layers=1)
    patch_model(model, config)
    cache = SVDCompressedCache(model)
    layer, attention = cache.layers[0], model.model.layers[0].self_attn
    generator = torch.Generator(RUN["device"]).manual_seed(1)
    shape = (batch, GEOMETRY["num_kv_heads"], context, GEOMETRY["head_dim"])
    keys = torch.randn(shape, device=RUN["device"], generator=generator).to(dtype)
    values = torch.randn(shape, device=RUN["device"], generator=generator).to(dtype)
    positions = (torch.arange(context, device=RUN["device"])[None] - torch.tensor([[pad]] + [[0]] * (batch - 1), device=RUN["device"])).clamp_min(0)
    la.append_to_cache(layer, keys, values, positions.to(torch.int32))
    query = torch.randn(batch, GEOMETRY["num_heads"], 1, GEOMETRY["head_dim"], device=RUN["device"], generator=generator).to(dtype)
    mask = None
    if pad:
        mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device=RUN["device"])
        mask[0, ..., :pad] = False
    return model, attention, layer, query, mask, (keys, values)


def reference_step(attention, layer, query, mask, rotary):
    """The reference path: rebuild every key and value, rotate keys at their positions, SDPA, o_proj."""
    projection = layer.projection
    keys = projection.key.decode(layer.keys, layer.head_dim).to(query.dtype)
    values = projection.value.decode(layer.values, layer.head_dim).to(query.dtype)
    cos, sin = rotary(values, layer.positions)
    keys = apply_rope(keys, cos, sin)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=attention.scaling, enable_gqa=True)
    return attention.o_proj(out.transpose(1, 2).reshape(query.shape[0], 1, -1))


def latent_step(attention, layer, query, mask, rotary, use_triton: bool, block_t: int = 64, num_warps: int = 4):
    state = la._layer_state(attention, layer)
    if use_triton:
        from hf_svdkv import triton_decode

        if (block_t, num_warps) == (64, 4):
            out = triton_decode.triton_latent_attention(query, layer, state, rotary, scaling=attention.scaling, attention_mask=mask)
        else:
            inv_freq = rotary.inv_freq.float()
            valid = None if mask is None else mask[:, 0, 0].to(torch.uint8)
            latent, _ = triton_decode.decode_latents(query[:, :, 0], layer, state, inv_freq, rotary.attention_scaling,
                                                     attention.scaling, valid, block_t, num_warps)
            out = la.LatentAttentionOutput(latent[:, None])
    else:
        rope = la.rope_factors(rotary, layer.positions)
        out = la.latent_attention(query, layer, state, rope, scaling=attention.scaling, attention_mask=mask)
    return la.project_output(attention, state, out)


@section("kernel_vs_torch_vs_reference")
def check_kernel() -> dict:
    rows = {}
    for name, config in CONFIGS.items():
        for dtype in (torch.float32, torch.bfloat16):
            model, attention, layer, query, mask, _ = filled_layer(config, dtype, batch=3, context=RUN["check_context"], pad=RUN["check_context"] // 40)
            rotary = model.model.rotary_emb
            with torch.no_grad():
                ref = reference_step(attention, layer, query, mask, rotary).float()
                torch_path = latent_step(attention, layer, query, mask, rotary, use_triton=False).float()
                kernel = latent_step(attention, layer, query, mask, rotary, use_triton=True).float()
            scale = ref.abs().max().item()
            key = f"{name} {str(dtype).removeprefix('torch.')}"
            rows[key] = {
                "max_ref": scale,
                "triton_vs_torch": (kernel - torch_path).abs().max().item(),
                "triton_vs_reference": (kernel - ref).abs().max().item(),
                "torch_vs_reference": (torch_path - ref).abs().max().item(),
            }
            print(f"{key:28s} " + "  ".join(f"{k} {v:.2e}" for k, v in rows[key].items()))
    return rows


def cuda_time(fn, warmup: int = 5, iters: int = 30) -> float:
    """Median milliseconds of fn() between two CUDA events, each call timed alone (launch overhead included)."""
    warmup, iters = min(warmup, RUN["max_iters"]), min(iters, RUN["max_iters"])
    for _ in range(warmup):
        fn()
    if RUN["device"] != "cuda":
        return statistics.median(_wall_ms(fn) for _ in range(iters))
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def graph_time(fn, iters: int = 30) -> float | None:
    """Median milliseconds of one replay of fn captured in a CUDA graph: GPU time without Python launch overhead."""
    if RUN["device"] != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return cuda_time(graph.replay, warmup=3, iters=iters)
    except Exception:  # noqa: BLE001 - a path that cannot be captured simply has no graph figure
        return None


def time_sdpa(context: int, batch: int) -> list[dict]:
    """SDPA over a full bf16 cache, both ways transformers calls it for one query token."""
    heads, kv_heads, head_dim = GEOMETRY["num_heads"], GEOMETRY["num_kv_heads"], GEOMETRY["head_dim"]
    query = torch.randn(batch, heads, 1, head_dim, device=RUN["device"], dtype=torch.bfloat16)
    keys = torch.randn(batch, kv_heads, context, head_dim, device=RUN["device"], dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    packed = query.view(batch, kv_heads, heads // kv_heads, head_dim)  # transformers' pack_gqa
    calls = {
        "sdpa enable_gqa": partial(F.scaled_dot_product_attention, query, keys, values, enable_gqa=True),
        "sdpa packed gqa": partial(F.scaled_dot_product_attention, packed, keys, values),
    }
    return [{"context": context, "batch": batch, "config": "full bf16", "path": name, "ms": cuda_time(fn),
             "graph_ms": graph_time(fn)} for name, fn in calls.items()]


def time_latent(context: int, batch: int, config_name: str, sdpa_ms: float, sdpa_graph_ms: float | None) -> list[dict]:
    """The Triton kernel (a few tile shapes), then whole steps with o_proj: Triton, torch latent path, reference."""
    from hf_svdkv import triton_decode

    model, attention, layer, query, _, _ = filled_layer(CONFIGS[config_name], torch.bfloat16, batch, context)
    rotary = model.model.rotary_emb
    state = la._layer_state(attention, layer)
    inv_freq = rotary.inv_freq.float()
    base = {"context": context, "batch": batch, "config": config_name}
    rows = []
    for block_t, warps in ((64, 4), (32, 4), (128, 4)):
        kernel = partial(triton_decode.decode_latents, query[:, :, 0], layer, state, inv_freq, 1.0, attention.scaling,
                         None, block_t, warps)
        ms, graph_ms = cuda_time(kernel), graph_time(kernel)
        rows.append({**base, "path": f"triton kernel T{block_t} w{warps}", "ms": ms, "graph_ms": graph_ms,
                     "speedup_vs_sdpa": sdpa_ms / ms,
                     "graph_speedup_vs_sdpa": sdpa_graph_ms / graph_ms if sdpa_graph_ms and graph_ms else None})
    steps = {
        "triton step + folded o_proj": partial(latent_step, attention, layer, query, None, rotary, True),
        "torch latent path + o_proj": partial(latent_step, attention, layer, query, None, rotary, False),
        "reference path + o_proj": partial(reference_step, attention, layer, query, None, rotary),
    }
    with torch.no_grad():
        for name, fn in steps.items():
            ms = cuda_time(fn, warmup=2, iters=10 if "reference" in name else 20)
            rows.append({**base, "path": name, "ms": ms, "graph_ms": None, "speedup_vs_sdpa": sdpa_ms / ms})
    return rows


@section("timing")
def timing() -> list[dict]:
    rows = []
    for context in RUN["contexts"]:  # the goal's 32k first, in case the time budget runs out
        for batch in RUN["batches"]:
            if time.perf_counter() - RUN["start"] > RUN["budget_s"]:
                RESULTS["errors"][f"timing {context}x{batch}"] = "skipped: the script's time budget is spent"
                continue
            sdpa = time_sdpa(context, batch)
            rows += sdpa
            best = min(r["ms"] for r in sdpa)
            best_graph = min((r["graph_ms"] for r in sdpa if r["graph_ms"] is not None), default=None)
            for config_name in CONFIGS:
                rows += time_latent(context, batch, config_name, best, best_graph)
            print(f"   context {context} batch {batch} done", flush=True)
    return rows


def print_tables() -> None:
    rows = RESULTS["sections"].get("timing") or []
    if rows:
        print("\n| context | batch | config | path | ms (events) | ms (graph) | x SDPA (best, events) | x SDPA (graph) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            def fmt(v, spec):
                return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
            print(f"| {r['context']} | {r['batch']} | {r['config']} | {r['path']} | {fmt(r['ms'], '.4f')} | "
                  f"{fmt(r.get('graph_ms'), '.4f')} | {fmt(r.get('speedup_vs_sdpa'), '.2f')} | "
                  f"{fmt(r.get('graph_speedup_vs_sdpa'), '.2f')} |")
    if RESULTS["errors"]:
        print("\nfailed sections: " + ", ".join(RESULTS["errors"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny sizes (tests the script)")
    args = parser.parse_args()
    RUN["out"] = args.out
    if args.dry_run:
        RUN.update(device="cpu", contexts=(200,), batches=(1, 2), check_context=150, model_tokens=40, max_iters=1,
                   budget_s=math.inf)
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--dry-run runs the script on CPU)")
        return 1
    import transformers
    import triton

    name = torch.cuda.get_device_name() if RUN["device"] == "cuda" else "cpu (dry run)"
    RESULTS.update(device=name, torch=torch.__version__, triton=triton.__version__,
                   transformers=transformers.__version__)
    print(json.dumps({k: RESULTS[k] for k in ("device", "torch", "triton", "transformers")}))
    run_sections()
    print_tables()
    write_json()
    return 0


if __name__ == "__main__":
    sys.exit(main())
