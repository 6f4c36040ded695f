"""Calibrated bases and rank allocation: exact statistics, exactness at full rank, optimality of the
output-aware value basis, byte budgets, determinism; one check on the real default model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, structured_ids, tiny_model, weights_config
from transformers import DynamicCache

from hf_svdkv import CompressionConfig, SVDBases, SVDCompressedCache, patch_model, unpatch_model
from hf_svdkv.allocation import (
    LayerSpectrum,
    allocate_ranks,
    budget_bytes,
    latent_budget,
    measure_sensitivity,
    uniform_ranks,
    weight_spectra,
    weight_spectrum_ranks,
)
from hf_svdkv.bases import calibrate_bases
from hf_svdkv.calibration import CalibratedPCA, collect_statistics, output_metric, query_metric, rope_rotations
from hf_svdkv.weight_svd import grouped_weight

pytest_plugins = ["fixtures_real"]


def calibration_ids(length: int = 300, seed: int = 5) -> torch.Tensor:
    return structured_ids(length, seed=seed)[0]


def test_statistics_match_activations_captured_directly():
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, head_dim=32, num_layers=2)
    ids = calibration_ids(70)  # 4 chunks of 16 (two batches) and a tail of 6
    captured = {0: [], 1: []}
    handles = [
        layer.self_attn.k_proj.register_forward_pre_hook(lambda _, args, i=i: captured[i].append(args[0][0].double()))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for chunk in ids.split(16):  # one sequence at a time, as a reference independent of the batching
            model(chunk[None], use_cache=False)
    for handle in handles:
        handle.remove()

    statistics = collect_statistics(model, ids, seq_len=16, batch_size=2, progress=False)
    assert all(not hook for layer in model.model.layers for hook in layer.self_attn.k_proj._forward_pre_hooks.values())
    for i, stats in enumerate(statistics):
        x = torch.cat(captured[i])
        first = torch.stack([chunk[0] for chunk in captured[i]])
        assert stats.count == 70 and stats.first.count == 5
        torch.testing.assert_close(stats.total, x.sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.outer, x.T @ x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.first.outer, first.T @ first, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.covariance, torch.cov(x.T, correction=0), rtol=1e-5, atol=1e-6)
        assert stats.total.dtype == torch.float64


def test_statistics_of_a_bf16_model_are_float64():
    model = tiny_model("llama", dtype=torch.bfloat16)
    statistics = collect_statistics(model, calibration_ids(40), seq_len=16, progress=False)
    assert statistics[0].outer.dtype == torch.float64 and torch.isfinite(statistics[0].outer).all()


def step_logits(model, ids: torch.Tensor, cache) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        logits = [out.logits]
        for _ in range(3):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return logits


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 32), (6, 2, 64)], ids=["gqa-d32", "gqa-d64"])
@pytest.mark.parametrize("joint", [False, True], ids=["per-head", "joint"])
@pytest.mark.parametrize("value_metric", ["output", "plain"])
def test_full_rank_calibrated_bases_match_dynamic_cache(arch, num_heads, num_kv_heads, head_dim, joint, value_metric):
    model = tiny_model(arch, num_heads, num_kv_heads, head_dim)
    group = num_kv_heads if joint else 1
    ids = structured_ids(24)
    reference = step_logits(model, ids, DynamicCache(config=model.config))
    config = CompressionConfig(key_rank=head_dim, value_rank=head_dim, group_size=group, method="calibrated")
    bases = calibrate_bases(model, calibration_ids(), config, seq_len=64, progress=False, value_metric=value_metric)
    eye = torch.eye(group * head_dim)
    for layer in bases.layers:
        for projection in (layer.key, layer.value):
            assert projection.down.dtype == torch.float32
            torch.testing.assert_close(projection.down[0] @ projection.up[0], eye, atol=2e-6, rtol=0)
    patch_model(model, bases=bases)
    for ref, got in zip(reference, step_logits(model, ids, SVDCompressedCache(model)), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def metric_error(projection, covariance: torch.Tensor, metric: torch.Tensor) -> float:
    """E[e M eᵀ] for the reconstruction error e = u (I - down up) of centered values u with covariance C."""
    residual = torch.eye(covariance.shape[-1], dtype=torch.float64) - (projection.down @ projection.up).double()
    return (residual @ metric @ residual.transpose(1, 2) @ covariance).diagonal(dim1=1, dim2=2).sum().item()


@pytest.mark.parametrize("num_heads,num_kv_heads,group", [(4, 2, 1), (4, 2, 2), (6, 2, 2), (4, 4, 2)])
def test_output_aware_values_are_optimal_in_the_output_metric(num_heads, num_kv_heads, group):
    model = tiny_model("qwen2", num_heads, num_kv_heads, head_dim=32, num_layers=2)
    statistics = collect_statistics(model, calibration_ids(), seq_len=64, progress=False)
    output, plain = CalibratedPCA(statistics, "output"), CalibratedPCA(statistics, "plain")
    rank = 12 * group
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        metric = output_metric(attn, group)
        weight, _ = grouped_weight(attn.v_proj, group, 32)
        _, covariance = statistics[i].moments(output.sink_weight)
        value_covariance = weight @ covariance @ weight.transpose(1, 2)
        best = metric_error(output.fit(i, attn, rank, rank, group).value, value_covariance, metric)
        assert best < metric_error(plain.fit(i, attn, rank, rank, group).value, value_covariance, metric)
        # The optimum is the tail of the whitened spectrum, which allocation reads as this basis' error.
        tail = output.spectrum(i, attn, group).value[:, rank:].sum().item()
        assert best == pytest.approx(tail, rel=1e-4)


def test_gqa_output_metric_sums_the_query_heads_of_each_kv_head():
    model = tiny_model("llama", num_heads=6, num_kv_heads=2, head_dim=32, num_layers=1)
    attn = model.model.layers[0].self_attn
    o_weight = attn.o_proj.weight.double()
    per_head = [o_weight[:, j * 32 : (j + 1) * 32] for j in range(6)]
    expected = [sum(w.T @ w for w in per_head[h * 3 : (h + 1) * 3]) for h in range(2)]
    torch.testing.assert_close(output_metric(attn, 1), torch.stack(expected))
    torch.testing.assert_close(output_metric(attn, 2)[0], torch.block_diag(*expected))


@pytest.mark.parametrize("num_heads,num_kv_heads,group", [(4, 2, 1), (6, 2, 2), (4, 4, 2)])
def test_query_metric_is_the_mean_squared_score_error(num_heads, num_kv_heads, group):
    """e Q eᵀ for a key error e equals the mean, over calibration tokens, query heads reading the key's KV head and the
    metric's distances Δ, of the squared error e makes in a score: (q_rot(m) · R(m - Δ) e)² with RoPE applied to both
    as the model applies it. Keys PCA'd in that metric leave less of it than plain PCA at the same rank."""
    model = tiny_model("qwen2", num_heads, num_kv_heads, head_dim=32, num_layers=1)  # q_proj has a bias
    ids = calibration_ids(64)
    attn = model.model.layers[0].self_attn
    captured = []
    handle = attn.q_proj.register_forward_hook(lambda _, args, out: captured.append(out[0].double()))
    statistics = collect_statistics(model, ids, seq_len=64, progress=False)
    handle.remove()
    rotations = rope_rotations(model, (3, 40, 9))
    queries = captured[0].view(64, num_heads, 32)  # pre-RoPE
    error = torch.randn(num_kv_heads, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    positions = torch.arange(-64, 64)  # a key Δ before a query may sit before the text: R(m)ᵀ R(m - Δ) = R(-Δ)
    cos, sin = (t[0].double() for t in model.model.rotary_emb(torch.zeros(1), positions[None]))

    def rope(x, at):  # x [..., 32] at positions `at`, as the model rotates (rotate-half layout)
        half = torch.cat([-x[..., 16:], x[..., :16]], -1)
        return x * cos[at + 64] + half * sin[at + 64]

    m = torch.arange(64)
    q = rope(queries, m[:, None].expand(-1, num_heads))  # [tokens, heads, 32]
    squared = torch.zeros(num_kv_heads, dtype=torch.float64)
    for delta in range(3, 40, 9):
        e = rope(error[None].expand(64, -1, -1), (m - delta)[:, None].expand(-1, num_kv_heads))
        score = torch.einsum("thd,thd->th", q, e.repeat_interleave(num_heads // num_kv_heads, dim=1))
        squared += score.square().view(64, num_kv_heads, -1).sum(-1).mean(0) / 5
    metric = query_metric(attn, statistics[0], rotations, group)
    flat = error.view(num_kv_heads // group, group * 32)
    assert rotations.shape[0] == 5
    torch.testing.assert_close(torch.einsum("gi,gij,gj->g", flat, metric, flat), squared.view(-1, group).sum(-1))

    ids = torch.randint(0, 96, (4096,), generator=torch.Generator().manual_seed(1))  # keys of full rank
    statistics = collect_statistics(model, ids, seq_len=64, progress=False)
    metric = query_metric(attn, statistics[0], rotations, group)
    plain, aware = CalibratedPCA(statistics), CalibratedPCA(statistics, key_rotations=rotations)
    weight, _ = grouped_weight(attn.k_proj, group, 32)
    _, covariance = statistics[0].moments(plain.sink_weight)
    key_covariance = weight @ covariance @ weight.transpose(1, 2)
    rank = 8 * group
    best = metric_error(aware.fit(0, attn, rank, rank, group).key, key_covariance, metric)
    assert best < metric_error(plain.fit(0, attn, rank, rank, group).key, key_covariance, metric)
    assert best == pytest.approx(aware.spectrum(0, attn, group).key[:, rank:].sum().item(), rel=1e-4)


def synthetic_spectra(layers: int = 6, groups: int = 2, dim: int = 64, seed: int = 0) -> list[LayerSpectrum]:
    generator = torch.Generator().manual_seed(seed)
    spectra = []
    for _ in range(layers):
        pair = []
        for _ in range(2):
            decay = 0.8 + 0.19 * torch.rand(groups, 1, generator=generator, dtype=torch.float64)
            pair.append(
                decay ** torch.arange(dim, dtype=torch.float64)
                * torch.rand(groups, 1, generator=generator, dtype=torch.float64)
            )
        spectra.append(LayerSpectrum(*pair))
    return spectra


@pytest.mark.parametrize("ratio", [1.3, 1.5, 2.0, 3.0, 4.0, 5.5, 7.0])
@pytest.mark.parametrize("groups,dim", [(1, 192), (3, 64), (2, 32)])
def test_allocation_respects_the_byte_budget_and_rank_range(ratio, groups, dim):
    spectra = synthetic_spectra(groups=groups, dim=dim, seed=int(ratio * 10))
    full_bytes = 6 * 2 * groups * dim * 2
    if budget_bytes([(8, 8)] * 6, spectra) > full_bytes / ratio:
        with pytest.raises(ValueError, match="beyond reach"):
            allocate_ranks(spectra, ratio)
        return
    weights = [(1.0 + i, 2.0) for i in range(6)]
    for ranks in (
        allocate_ranks(spectra, ratio),
        allocate_ranks(spectra, ratio, weights),
        uniform_ranks(spectra, ratio),
    ):
        assert budget_bytes(ranks, spectra) <= full_bytes / ratio
        assert all(8 <= r <= dim for pair in ranks for r in pair)
    allocated = allocate_ranks(spectra, ratio)
    if all(r < dim for pair in allocated for r in pair):  # nothing saturated: the budget is spent to the last step
        assert latent_budget(spectra, ratio) - sum(k + v for k, v in allocated) * groups < groups


def test_allocation_gives_rank_where_the_spectrum_is_flat_and_weight_is_high():
    dim = 64
    flat = torch.ones(1, dim, dtype=torch.float64)
    steep = 0.5 ** torch.arange(dim, dtype=torch.float64)[None]
    ranks = allocate_ranks([LayerSpectrum(steep, flat), LayerSpectrum(steep, steep)], 2.0)
    assert ranks[0][1] > ranks[1][1] and ranks[0][1] > ranks[0][0]
    weighted = allocate_ranks([LayerSpectrum(flat, flat), LayerSpectrum(flat, flat)], 2.0, [(10.0, 1.0), (1.0, 1.0)])
    assert weighted[0][0] == max(r for pair in weighted for r in pair)
    assert sum(r % 8 != 0 for pair in weighted for r in pair) <= 1  # multiples of 8, one item takes the remainder


def test_weight_spectrum_ranks_build_bases_within_budget():
    model = tiny_model("llama", num_heads=4, num_kv_heads=2, head_dim=32, num_layers=3, dtype=torch.bfloat16)
    config = weights_config(target_ratio=2.5, group_size=2)
    ranks = weight_spectrum_ranks(model, config)
    bases = SVDBases.from_model(model, config, layer_ranks=ranks)
    patch_model(model, bases=bases)
    cache = SVDCompressedCache(model)
    with torch.no_grad():
        model(structured_ids(20), past_key_values=cache)
    full = 3 * 2 * 2 * 32 * 2
    assert cache.bytes_per_token() == budget_bytes(ranks, weight_spectra(model, 2)) <= full / 2.5
    with pytest.raises(ValueError, match="target_ratio"):
        weight_spectrum_ranks(model, weights_config(key_rank=8, value_rank=8))


def test_sensitivity_is_zero_at_full_rank_and_positive_below():
    model = tiny_model("llama", num_layers=2)
    algorithm = CalibratedPCA(collect_statistics(model, calibration_ids(), seq_len=64, progress=False))

    def fit(i, attn, key_rank, value_rank):
        return algorithm.fit(i, attn, key_rank, value_rank, 1)

    ids = calibration_ids(128, seed=9)
    full = measure_sensitivity(model, fit, ids, [(32, 32)] * 2, seq_len=64, progress=False)
    low = measure_sensitivity(model, fit, ids, [(4, 4)] * 2, seq_len=64, progress=False)
    assert all(abs(kl) < 1e-6 for pair in full for kl in pair)
    assert all(kl > 1e-5 for pair in low for kl in pair)
    # The probe skips the layers before the compressed one; a plain full forward must agree.
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        reference = model(ids.view(2, 64)).logits.log_softmax(-1)
        handle = attn.v_proj.register_forward_hook(lambda _, args, out: reconstruct(out, fit(1, attn, 4, 4).value))
        probe = model(ids.view(2, 64)).logits.log_softmax(-1)
        handle.remove()
    expected = torch.nn.functional.kl_div(probe, reference, log_target=True, reduction="sum").item() / 128
    assert low[1][1] == pytest.approx(expected, rel=1e-4)


def reconstruct(output: torch.Tensor, projection) -> torch.Tensor:
    states = output.view(*output.shape[:2], -1, 32).transpose(1, 2)
    return projection.decode(projection.encode(states), 32).transpose(1, 2).reshape(output.shape)


@pytest.mark.parametrize("allocation", ["sensitivity", "spectrum"])
def test_calibrating_twice_gives_identical_bases(allocation):
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, head_dim=32, num_layers=2)
    config = CompressionConfig(target_ratio=2.5, group_size=2, method="calibrated")
    first, second = (
        calibrate_bases(
            model, calibration_ids(), config, seq_len=64, progress=False, allocation=allocation, probe_tokens=128
        )
        for _ in range(2)
    )
    assert first.key_ranks == second.key_ranks and first.value_ranks == second.value_ranks
    assert first.method == "calibrated"
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


@pytest.mark.slow
def test_calibrated_bases_beat_weight_bases_on_the_default_model(default_model, wiki_text):
    from hf_svdkv.text import make_windows, split_calibration, tokenize_text
    from hf_svdkv.tools.eval import RowSpec, dynamic_row, run_eval

    model, tokenizer = default_model
    ids = tokenize_text(tokenizer, wiki_text[:400_000], model.config.vocab_size)
    calib_ids, eval_ids = split_calibration(ids, 8192)  # disjoint: windows come from the rest
    config = weights_config(key_rank=32, value_rank=32, group_size=3)
    bases = {
        "weights": SVDBases.from_model(model, config),
        "calibrated": calibrate_bases(model, calib_ids, config, progress=False),
    }

    def row(name: str) -> RowSpec:
        def setup(model):
            patch_model(model, bases=bases[name])
            return lambda: SVDCompressedCache(model)

        return RowSpec(name, setup=setup, teardown=unpatch_model)

    window = make_windows(eval_ids, 1024, 1)[0]
    result = run_eval(
        model,
        window,
        [dynamic_row(), row("weights"), row("calibrated")],
        context=768,
        continuation=256,
        n_windows=1,
        progress=False,
    )
    delta = {r.name: r.delta_pct for r in result.rows}
    assert delta["calibrated"] < delta["weights"] / 10
    assert delta["calibrated"] < 100.0
