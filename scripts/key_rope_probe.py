"""Can keys be compressed after RoPE? A quality probe on the default model (docs/key_rope.md):

    python scripts/key_rope_probe.py --markdown docs/key_rope.md

hf_svdkv stores keys before RoPE, so a decoding step must rebuild every cached key and rotate it at its position
before scoring it (about 26k multiply-adds per token and layer at 4x on the default model). A basis of keys *after*
RoPE would let a step score the latents directly: the query projected once into the latent space, then one dot
product of rank numbers per token and query head (about 20x fewer multiply-adds). It only pays if post-RoPE keys
are as low-rank as pre-RoPE ones.

Both bases are the same plain PCA (centered, joint over each layer's KV heads, as the default's joint bases are) of
the keys of the calibration text (the corpus' last 16,384 tokens, in windows of `--window` tokens), before or after
the rotation. Perplexity is that of the model on windows of the scored text with every key replaced by its
projection on the first `rank` components (values, queries and everything else exact; bfloat16 model), the same
windows and model for both. The rotation is intercepted through `apply_rotary_pos_emb` of transformers' Llama module,
for this run only.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers.models.llama import modeling_llama

from hf_svdkv.calibration import LayerStatistics
from hf_svdkv.text import load_text, split_calibration, tokenize_text
from hf_svdkv.tools.loading import load_model

CALIBRATION_TOKENS = 16384
RANKS = (32, 48, 64, 96, 128)


def joint(keys: torch.Tensor) -> torch.Tensor:
    """[batch, kv_heads, seq, head_dim] -> [batch * seq, kv_heads * head_dim] float64."""
    batch, heads, seq, dim = keys.shape
    return keys.transpose(1, 2).reshape(batch * seq, heads * dim).double()


class KeyProbe:
    """Collects key moments per layer before and after RoPE, or replaces keys by their projection on a basis."""

    def __init__(self, model: torch.nn.Module):
        self.rotate = modeling_llama.apply_rotary_pos_emb
        self.layer, self.mode, self.bases = 0, "collect", {}
        width = model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
        layers = model.config.num_hidden_layers
        self.statistics = {
            kind: [LayerStatistics.zeros(width, torch.device("cpu"), with_first=False) for _ in range(layers)]
            for kind in ("pre", "post")
        }
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(lambda module, args, index=index: setattr(self, "layer", index))

    def project(self, keys: torch.Tensor) -> torch.Tensor:
        basis, mean = self.bases[self.layer]
        x = joint(keys)
        projected = (x - mean) @ basis @ basis.T + mean
        batch, heads, seq, dim = keys.shape
        return projected.reshape(batch, seq, heads, dim).transpose(1, 2).to(keys.dtype)

    def __call__(self, query, key, cos, sin, unsqueeze_dim=1):
        if self.mode == "collect":
            rotated = self.rotate(query, key, cos, sin, unsqueeze_dim)
            for kind, keys in (("pre", key), ("post", rotated[1])):
                self.statistics[kind][self.layer].add(joint(keys))
            return rotated
        if self.mode == "pre":
            key = self.project(key)
        query, key = self.rotate(query, key, cos, sin, unsqueeze_dim)
        if self.mode == "post":
            key = self.project(key)
        return query, key

    def principal(self, kind: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(eigenvalues descending, eigenvectors, mean) of each layer's key covariance."""
        result = []
        for statistics in self.statistics[kind]:
            values, vectors = torch.linalg.eigh(statistics.covariance)
            result.append((values.flip(0).clamp_min(0), vectors.flip(1), statistics.mean))
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--window", type=int, default=2048, help="tokens per calibration and scored window")
    parser.add_argument("--windows", type=int, default=3, help="scored windows")
    args = parser.parse_args()

    model, tokenizer = load_model()
    ids = tokenize_text(tokenizer, load_text("wiki"), model.config.vocab_size)
    calibration, scored = split_calibration(ids, CALIBRATION_TOKENS)
    windows = [scored[i * args.window : (i + 1) * args.window] for i in range(args.windows)]
    probe = KeyProbe(model)
    modeling_llama.apply_rotary_pos_emb = probe
    try:
        with torch.inference_mode():
            for start in range(0, calibration.numel() - args.window + 1, args.window):
                model(calibration[None, start : start + args.window])
            spectra = {kind: probe.principal(kind) for kind in ("pre", "post")}

            def perplexity(mode: str) -> float:
                probe.mode, nll, count = mode, 0.0, 0
                for window in windows:
                    logits = model(window[None]).logits[0, :-1].float()
                    nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
                    count += window.numel() - 1
                return math.exp(nll / count)

            baseline = perplexity("exact")
            rows = []
            for rank in RANKS:
                row = [str(rank)]
                for kind in ("pre", "post"):
                    probe.bases = {i: (vectors[:, :rank], mean) for i, (_, vectors, mean) in enumerate(spectra[kind])}
                    left = sum((v[rank:].sum() / v.sum()).item() for v, _, _ in spectra[kind]) / len(spectra[kind])
                    ppl = perplexity(kind)
                    row += [f"{ppl:.3f}", f"{(ppl / baseline - 1) * 100:+.2f}%", f"{left:.4f}"]
                rows.append(row)
    finally:
        modeling_llama.apply_rotary_pos_emb = probe.rotate

    width = probe.statistics["pre"][0].total.numel()
    lines = [
        f"`python scripts/key_rope_probe.py --markdown docs/key_rope.md` (torch threads: {torch.get_num_threads()})",
        "",
        f"{args.windows} windows of {args.window:,} tokens, exact keys: ppl {baseline:.3f}. Rank of {width} "
        "(joint over the layer's KV heads); residual: the share of the key variance the rank leaves out, mean over "
        "layers.",
        "",
        "| rank | before RoPE ppl | Δ ppl | residual | after RoPE ppl | Δ ppl | residual |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
