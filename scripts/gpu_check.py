"""One self-contained GPU check of hf_svdkv's decode paths: correctness, then timing. Writes gpu_check.json and
gpu_check.md to --out.

    python scripts/gpu_check.py --out $OUT          # at most about 7 minutes; no model download, no network
    TRITON_INTERPRET=1 python scripts/gpu_check.py --dry-run --out /tmp/gc   # the same code on CPU, tiny sizes

(a) correctness on CUDA: a tiny random Llama (GQA) at full rank, patched (latent path as wired, Triton on decode)
    and with the latent path switched off, vs DynamicCache (float32, bf16, fp16), left-padded batch;
(b) the Triton kernel vs the torch latent path vs the reference path (rebuild everything, RoPE, SDPA) on one layer of
    the default model's geometry (9 query heads, 3 KV heads, head_dim 64), float32/bf16/fp16, batch 1 and 8, latents
    in the model dtype and as int8 and int4 codes;
(c) timing (CUDA events, warm-up, median; and CUDA-graph replay) of one decode attention step at 32k and 8k tokens,
    batch 1 and 8: SDPA over a full bf16 cache vs the Triton kernel (several launch settings), the torch latent path
    and the reference path, for a 2x cache: the default geometry (per-head 32/32, joint 96/96) and a Llama-3-8B-like
    layer (32 query heads, 8 KV heads x 128; per-head 64/64); at 32k the same configs with int8 and int4 latents
    (the kernel at two launch settings, the Triton and torch steps);
(d) end to end, if time is left: decode tokens/s of a random-weight model of the default model's size (30 layers)
    with DynamicCache vs the 2x SVD cache at 32k tokens, batch 1 and 8 (hf_svdkv.tools.bench.measure).
Every section runs under its own try/except: a failure is recorded and the rest still runs; the files are rewritten
after every section, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from hf_svdkv import (  # noqa: E402
    CompressionConfig,
    SVDCompressedCache,
    decode,  # noqa: E402
    patch_model,
)
from hf_svdkv.attention import apply_rope  # noqa: E402
from hf_svdkv.decode.blockwise import BlockwiseBackend  # noqa: E402
from hf_svdkv.decode.triton_kernel import TritonBackend  # noqa: E402

RESULTS: dict = {"sections": {}, "errors": {}}
SECTIONS: list = []
# --dry-run: the same code on CPU (kernels in Triton's interpreter), tiny sizes, to catch script bugs without a GPU.
# Timing cases still pending after budget_s seconds are skipped (and listed under errors), and the end-to-end section
# if it would start after e2e_budget_s, to stay within about 7 minutes.
RUN = {
    "device": "cuda",
    "contexts": (32768, 8192),
    "batches": (1, 8),
    "check_context": 5000,
    "check_batches": (1, 8),
    "model_tokens": 300,
    "e2e_contexts": (32768,),
    "e2e_layers": 30,
    "e2e_steps": 16,
    "max_iters": 1000,
    "budget_s": 270.0,
    "e2e_budget_s": 330.0,
    "start": time.perf_counter(),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GEOMETRY = {"num_heads": 9, "num_kv_heads": 3, "head_dim": 64}  # SmolLM2-135M's attention


def svd_config(**fields) -> CompressionConfig:
    """Weight-only bases (a random model has no text to calibrate on), no window and no exact prefill: the checks
    compare what the latents give, every token read as a latent."""
    return CompressionConfig(method="weights", window=0, exact_prefill=False, **fields)


CONFIGS = {
    "per-head 32/32": svd_config(key_rank=32, value_rank=32),
    "joint 96/96": svd_config(key_rank=32, value_rank=32, group_size=3),
}
# Timing also runs on a Llama-3-8B-like layer, where the cache read is 5x larger per token than the default model's.
TIMED = {
    "smollm2-135m 9q/3kv x64": (GEOMETRY, CONFIGS),
    "llama3-8b-like 32q/8kv x128": (
        {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128},
        {"per-head 64/64": svd_config(key_rank=64, value_rank=64)},
    ),
}
# Integer latents: codes the kernel dequantizes in registers, so its tiles hold more live values than with 16-bit
# latents; they are timed at a smaller tile too. Only at the first context, which decides whether 4-bit pays.
LATENT_BITS = (8, 4)
QUANTIZED_VARIANTS = ("T64 w4 4/SM (default)", "T32 w4 4/SM")
# Kernel launch settings timed against each other (decode_latents' defaults are the "default" row).
KERNEL_VARIANTS = {
    "T64 w4 2/SM direct rope": dict(programs_per_sm=2, rope_by_tile=False),  # session 2's kernel, q loads hoisted
    "T64 w4 4/SM (default)": {},
    "T64 w4 2/SM": dict(programs_per_sm=2),
    "T64 w4 8/SM": dict(programs_per_sm=8),
    "T32 w4 4/SM": dict(block_t=32),
    "T128 w8 4/SM": dict(block_t=128, num_warps=8),
}


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
    (out / "gpu_check.md").write_text(markdown())


def tiny_llama(
    dtype: torch.dtype,
    layers: int = 2,
    hidden_per_head: int = 64,
    vocab: int = 256,
    intermediate: int = 1024,
    geometry: dict = GEOMETRY,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=geometry["num_heads"] * hidden_per_head,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=geometry["num_heads"],
        num_key_value_heads=geometry["num_kv_heads"],
        head_dim=geometry["head_dim"],
        max_position_embeddings=65536,
        initializer_range=0.08,
        tie_word_embeddings=False,
        pad_token_id=0,
        rope_theta=100000.0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(RUN["device"], dtype).eval()


def step_logits(model, ids, cache, mask=None, steps: int = 8, tokens: torch.Tensor | None = None):
    """Logits of the prefill's last token and of `steps` single-token steps; feeds `tokens` [batch, steps] when given
    (so two caches are compared on the same inputs), else its own greedy choices. Returns (logits, tokens fed)."""
    fed = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache)
        logits = [out.logits[:, -1:]]
        for step in range(steps):
            nxt = out.logits[:, -1:].argmax(-1) if tokens is None else tokens[:, step : step + 1]
            fed.append(nxt)
            mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(nxt, attention_mask=mask, past_key_values=cache)
            logits.append(out.logits)
    return torch.cat(logits, dim=1).float(), torch.cat(fed, dim=1)


@section("model_full_rank")
def check_model() -> dict:
    """Patched vs DynamicCache at full rank (float32 exact up to rounding, 16-bit within rounding), both with the
    latent path as wired (Triton on decode) and with it switched off (the reference path)."""
    from transformers import DynamicCache

    import hf_svdkv.attention

    rows = {}
    ids = torch.randint(
        3, 256, (2, RUN["model_tokens"]), device=RUN["device"], generator=torch.Generator(RUN["device"]).manual_seed(0)
    )
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding on row 1
    wired = hf_svdkv.attention.use_latent_attention
    for dtype in DTYPES:
        model = tiny_llama(dtype)
        expected, tokens = step_logits(model, ids, DynamicCache(config=model.config), mask)
        for name, group in (("per-head", 1), ("joint", 3)):
            full = svd_config(key_rank=64, value_rank=64, group_size=group)
            for wiring in ("latent", "reference"):
                hf_svdkv.attention.use_latent_attention = wired if wiring == "latent" else (lambda *args: False)
                try:
                    patch_model(model, full)
                    got, _ = step_logits(model, ids, SVDCompressedCache(model), mask, tokens=tokens)
                finally:
                    hf_svdkv.attention.use_latent_attention = wired
                diff = (got - expected).abs().max().item()
                same = bool((got.argmax(-1) == expected.argmax(-1)).all())
                rows[f"{str(dtype).removeprefix('torch.')} {name} {wiring}"] = {
                    "max_abs_logit_diff": diff,
                    "same_argmax": same,
                    "logit_scale": expected.abs().max().item(),
                }
        del model
    for key, value in rows.items():
        print(
            f"{key:32s} max|Δlogit| {value['max_abs_logit_diff']:.2e} (scale {value['logit_scale']:.1f})  "
            f"same argmax: {value['same_argmax']}"
        )
    return rows


def filled_layer(
    config: CompressionConfig, dtype: torch.dtype, batch: int, context: int, pad: int = 0, geometry: dict = GEOMETRY
):
    """A 1-layer model of `geometry`, patched with `config`, its cache layer holding `context` random tokens."""
    model = tiny_llama(dtype, layers=1, geometry=geometry)
    patch_model(model, config)
    cache = SVDCompressedCache(model)
    layer, attention = cache.layers[0], model.model.layers[0].self_attn
    generator = torch.Generator(RUN["device"]).manual_seed(1)
    shape = (batch, geometry["num_kv_heads"], context, geometry["head_dim"])
    keys = torch.randn(shape, device=RUN["device"], generator=generator).to(dtype)
    values = torch.randn(shape, device=RUN["device"], generator=generator).to(dtype)
    positions = (
        torch.arange(context, device=RUN["device"])[None]
        - torch.tensor([[pad]] + [[0]] * (batch - 1), device=RUN["device"])
    ).clamp_min(0)
    layer.append(keys, values, positions.to(torch.int32))
    query = torch.randn(
        batch, geometry["num_heads"], 1, geometry["head_dim"], device=RUN["device"], generator=generator
    ).to(dtype)
    mask = None
    if pad:
        mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device=RUN["device"])
        mask[0, ..., :pad] = False
    return model, attention, layer, query, mask, (keys, values)


def reference_step(attention, layer, query, mask, rotary):
    """The reference path: rebuild every key and value, rotate keys at their positions, SDPA, o_proj."""
    projection = layer.projection
    keys = projection.key.decode(layer.keys.read(), layer.head_dim).to(query.dtype)
    values = projection.value.decode(layer.values.read(), layer.head_dim).to(query.dtype)
    cos, sin = rotary(values, layer.positions)
    keys = apply_rope(keys, cos, sin)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=attention.scaling, enable_gqa=True)
    return attention.o_proj(out.transpose(1, 2).reshape(query.shape[0], 1, -1))


def latent_step(attention, layer, query, mask, rotary, use_triton: bool):
    """One decoding step over the latents through the Triton kernel or the torch path, o_proj included."""
    state = decode.layer_state(attention, layer)
    backend = TritonBackend() if use_triton else BlockwiseBackend()
    rope = decode.Rope(rotary, layer.positions)
    latent, lse = backend.attend(query, layer, state, rope, scaling=attention.scaling, attention_mask=mask)
    out = decode.window.attend_window(
        query, latent, lse, layer, state, rope, None, scaling=attention.scaling, attention_mask=mask
    )
    return decode.project_output(attention, state, out)


def with_latent_bits(configs: dict) -> dict:
    """Each config followed by the same with int8 and int4 latents."""
    return {
        f"{name}{f' int{bits}' if bits else ''}": dataclasses.replace(config, latent_bits=bits)
        for name, config in configs.items()
        for bits in (None, *LATENT_BITS)
    }


@section("kernel_vs_torch_vs_reference")
def check_kernel() -> dict:
    rows = {}
    context = RUN["check_context"]
    for name, config in with_latent_bits(CONFIGS).items():
        for dtype in DTYPES:
            for batch in RUN["check_batches"]:
                model, attention, layer, query, mask, _ = filled_layer(
                    config, dtype, batch=batch, context=context, pad=context // 40
                )
                rotary = model.model.rotary_emb
                with torch.no_grad():
                    ref = reference_step(attention, layer, query, mask, rotary).float()
                    torch_path = latent_step(attention, layer, query, mask, rotary, use_triton=False).float()
                    kernel = latent_step(attention, layer, query, mask, rotary, use_triton=True).float()
                scale = ref.abs().max().item()
                key = f"{name} {str(dtype).removeprefix('torch.')} batch {batch}"
                rows[key] = {
                    "max_ref": scale,
                    "triton_vs_torch": (kernel - torch_path).abs().max().item(),
                    "triton_vs_reference": (kernel - ref).abs().max().item(),
                    "torch_vs_reference": (torch_path - ref).abs().max().item(),
                }
                # 16-bit: the reference rounds rebuilt keys and values to the model dtype, the latent paths do not.
                tolerance = 1e-4 if dtype == torch.float32 else 3e-2
                rows[key]["ok"] = rows[key]["triton_vs_torch"] <= tolerance * max(scale, 1.0)
                print(
                    f"{key:36s} "
                    + "  ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[key].items())
                )
                del model
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


def time_sdpa(context: int, batch: int, geometry: dict) -> list[dict]:
    """SDPA over a full bf16 cache, both ways transformers calls it for one query token."""
    heads, kv_heads, head_dim = geometry["num_heads"], geometry["num_kv_heads"], geometry["head_dim"]
    query = torch.randn(batch, heads, 1, head_dim, device=RUN["device"], dtype=torch.bfloat16)
    keys = torch.randn(batch, kv_heads, context, head_dim, device=RUN["device"], dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    packed = query.view(batch, kv_heads, heads // kv_heads, head_dim)  # transformers' pack_gqa
    calls = {
        "sdpa enable_gqa": partial(F.scaled_dot_product_attention, query, keys, values, enable_gqa=True),
        "sdpa packed gqa": partial(F.scaled_dot_product_attention, packed, keys, values),
    }
    return [
        {
            "context": context,
            "batch": batch,
            "config": "full bf16",
            "path": name,
            "ms": cuda_time(fn),
            "graph_ms": graph_time(fn),
        }
        for name, fn in calls.items()
    ]


def time_latent(
    context: int,
    batch: int,
    geometry: dict,
    config: CompressionConfig,
    base: dict,
    sdpa_ms: float,
    sdpa_graph_ms: float | None,
    variants: tuple[str, ...] = tuple(KERNEL_VARIANTS),
    reference: bool = True,
) -> list[dict]:
    """The Triton kernel (each of `variants`, names in KERNEL_VARIANTS), then whole steps with o_proj: Triton, torch
    latent path, and the reference path unless `reference` is False."""
    from hf_svdkv.decode import triton_kernel

    model, attention, layer, query, _, _ = filled_layer(config, torch.bfloat16, batch, context, geometry=geometry)
    rotary = model.model.rotary_emb
    state = decode.layer_state(attention, layer)
    inv_freq = rotary.inv_freq.float()
    rows = []
    for variant in variants:
        kernel = partial(
            triton_kernel.decode_latents,
            query[:, :, 0],
            layer,
            state,
            inv_freq,
            1.0,
            attention.scaling,
            None,
            **KERNEL_VARIANTS[variant],
        )
        ms, graph_ms = cuda_time(kernel), graph_time(kernel)
        rows.append(
            {
                **base,
                "path": f"triton kernel {variant}",
                "ms": ms,
                "graph_ms": graph_ms,
                "speedup_vs_sdpa": sdpa_ms / ms,
                "graph_speedup_vs_sdpa": sdpa_graph_ms / graph_ms if sdpa_graph_ms and graph_ms else None,
            }
        )
    steps = {
        "triton step + folded o_proj": partial(latent_step, attention, layer, query, None, rotary, True),
        "torch latent path + o_proj": partial(latent_step, attention, layer, query, None, rotary, False),
    }
    if reference:
        steps["reference path + o_proj"] = partial(reference_step, attention, layer, query, None, rotary)
    with torch.no_grad():
        for name, fn in steps.items():
            ms = cuda_time(fn, warmup=2, iters=10 if "reference" in name else 20)
            rows.append({**base, "path": name, "ms": ms, "graph_ms": None, "speedup_vs_sdpa": sdpa_ms / ms})
    del model, layer
    return rows


@section("timing")
def timing() -> list[dict]:
    rows = []
    for context in RUN["contexts"]:  # the goal's 32k first, in case the time budget runs out
        for batch in RUN["batches"]:
            for geometry_name, (geometry, configs) in TIMED.items():
                if time.perf_counter() - RUN["start"] > RUN["budget_s"]:
                    RESULTS["errors"][f"timing {context}x{batch} {geometry_name}"] = (
                        "skipped: the script's time budget is spent"
                    )
                    continue
                sdpa = [{**row, "geometry": geometry_name} for row in time_sdpa(context, batch, geometry)]
                rows += sdpa
                best = min(r["ms"] for r in sdpa)
                best_graph = min((r["graph_ms"] for r in sdpa if r["graph_ms"] is not None), default=None)
                for config_name, config in configs.items():
                    base = {"context": context, "batch": batch, "geometry": geometry_name, "config": config_name}
                    rows += time_latent(context, batch, geometry, config, base, best, best_graph)
                    for bits in LATENT_BITS if context == RUN["contexts"][0] else ():
                        quantized = dataclasses.replace(config, latent_bits=bits)
                        named = {**base, "config": f"{config_name} int{bits}"}
                        rows += time_latent(
                            context,
                            batch,
                            geometry,
                            quantized,
                            named,
                            best,
                            best_graph,
                            QUANTIZED_VARIANTS,
                            reference=False,
                        )
                print(f"   context {context} batch {batch} {geometry_name} done", flush=True)
                if RUN["device"] == "cuda":
                    torch.cuda.empty_cache()
    return rows


@section("model_decode")
def model_decode() -> list[dict]:
    """End to end: a random model of the default model's size, DynamicCache vs the 2x SVD cache (latent path,
    Triton)."""
    from hf_svdkv.tools.bench import run_rows
    from hf_svdkv.tools.eval import build_rows

    if time.perf_counter() - RUN["start"] > RUN["e2e_budget_s"]:
        raise RuntimeError("skipped: the script's time budget is spent")
    model = tiny_llama(torch.bfloat16, layers=RUN["e2e_layers"], vocab=49152, intermediate=1536)
    rows = build_rows(configs=[svd_config(key_rank=32, value_rank=32)])
    measured = run_rows(
        model,
        rows,
        list(RUN["e2e_contexts"]),
        list(RUN["batches"]),
        steps=RUN["e2e_steps"],
        warmup=3,
        prefill_chunk=min(8192, min(RUN["e2e_contexts"])),
    )
    base = {(r.context, r.batch): r for r in measured if r.name == "dynamic"}
    out = []
    for r in measured:
        ref = base[r.context, r.batch]
        out.append(
            {
                "name": r.name,
                "context": r.context,
                "batch": r.batch,
                "prefill_s": r.prefill_s,
                "decode_tokens_per_s": r.decode_tokens_per_s,
                "x_dynamic": r.decode_tokens_per_s / ref.decode_tokens_per_s,
                "peak_mem_bytes": r.peak_mem_bytes,
                "kv_bytes": r.kv_bytes,
                "kv_x_smaller": ref.kv_bytes / r.kv_bytes,
            }
        )
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown() -> str:
    """Every section as markdown tables (what gpu_check.md holds)."""
    lines = [
        f"# gpu_check: {RESULTS.get('device')}",
        "",
        f"torch {RESULTS.get('torch')}, triton {RESULTS.get('triton')}, transformers {RESULTS.get('transformers')}; "
        f"{RESULTS.get('seconds', 0):.0f} s; command: `{RESULTS.get('command')}`",
        "",
    ]
    model = RESULTS["sections"].get("model_full_rank")
    if model:
        lines += [
            "## Full rank vs DynamicCache (tiny random Llama, GQA, left-padded batch; decode fed the dynamic run's "
            "tokens)",
            "",
            "| dtype, bases, path | max abs logit diff | logit scale | same argmax |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['max_abs_logit_diff']:.2e} | {v['logit_scale']:.1f} | {v['same_argmax']} |"
            for k, v in model.items()
        ]
        lines.append("")
    kernel = RESULTS["sections"].get("kernel_vs_torch_vs_reference")
    if kernel:
        lines += [
            "## One decode step: Triton kernel vs torch latent path vs reference path (output after o_proj)",
            "",
            "| config dtype batch | max ref | triton vs torch | triton vs reference | torch vs reference | ok |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['max_ref']:.3g} | {v['triton_vs_torch']:.2e} | {v['triton_vs_reference']:.2e} | "
            f"{v['torch_vs_reference']:.2e} | {v['ok']} |"
            for k, v in kernel.items()
        ]
        lines.append("")
    rows = RESULTS["sections"].get("timing") or []
    if rows:
        lines += [
            "## Timing of one decode attention step (bf16; ms, median of CUDA events; graph = CUDA-graph replay)",
            "",
            "| context | batch | geometry | config | path | ms (events) | ms (graph) | x SDPA (best, events) "
            "| x SDPA (graph) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['context']} | {r['batch']} | {r.get('geometry', '-')} | {r['config']} | {r['path']} "
            f"| {_fmt(r['ms'], '.4f')} | "
            f"{_fmt(r.get('graph_ms'), '.4f')} | {_fmt(r.get('speedup_vs_sdpa'), '.2f')} | "
            f"{_fmt(r.get('graph_speedup_vs_sdpa'), '.2f')} |"
            for r in rows
        ]
        lines.append("")
    e2e = RESULTS["sections"].get("model_decode")
    if e2e:
        lines += [
            "## End to end: random model of the default model's size, decode tokens/s",
            "",
            "| row | context | batch | prefill s | decode tok/s | x dynamic | peak MiB | KV MiB | KV x smaller |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['name']} | {r['context']} | {r['batch']} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['x_dynamic']:.2f} | {_fmt(r['peak_mem_bytes'] and r['peak_mem_bytes'] / 2**20, '.1f')} | "
            f"{r['kv_bytes'] / 2**20:.1f} | {r['kv_x_smaller']:.2f} |"
            for r in e2e
        ]
        lines.append("")
    if RESULTS["errors"]:
        lines += ["## Failed or skipped", ""] + [
            f"- {name}: `{' '.join(str(err).split())[-300:]}`" for name, err in RESULTS["errors"].items()
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU + Triton interpreter, tiny sizes (tests the script)"
    )
    args = parser.parse_args()
    RUN["out"] = args.out
    RESULTS["command"] = "python3 scripts/gpu_check.py " + " ".join(sys.argv[1:])
    if args.dry_run:
        RUN.update(
            device="cpu",
            contexts=(200,),
            batches=(1, 2),
            check_context=150,
            check_batches=(1, 2),
            model_tokens=40,
            e2e_contexts=(64,),
            e2e_layers=2,
            e2e_steps=2,
            max_iters=1,
            budget_s=math.inf,
            e2e_budget_s=math.inf,
        )
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--dry-run runs the script on CPU)")
        return 1
    import transformers
    import triton

    name = torch.cuda.get_device_name() if RUN["device"] == "cuda" else "cpu (dry run)"
    RESULTS.update(
        device=name, torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__
    )
    print(json.dumps({k: RESULTS[k] for k in ("device", "torch", "triton", "transformers")}))
    run_sections()
    write_json()
    print(markdown())
    return 1 if RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
