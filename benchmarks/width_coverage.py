"""Which hidden widths structured pruning finds, model by model: for each model of the coverage sweep
(benchmarks/coverage.py) plus EfficientNet-B0 (timm's, torchvision's, Hugging Face's), torchvision's MobileNetV3
and ReXNet (inverted residuals with squeeze-excitation), RegNet and ResNeXt (bottlenecks with a grouped
convolution), timm's gMLP-Mixer (gated MLPs packed in one layer) and small randomly initialized
Hugging Face GPT-2, LLaMA, Qwen3, Phi-3, OPT and GPT-NeoX models and 28 more architectures built by
model type ("hf-auto:<type>", AUTO_HF: encoders as MPNet, RoFormer, DeBERTa-v2, ModernBERT and ALBERT (one layer
shared by all), decoders as Gemma 2
and 3, OLMo, Cohere, GPT-J, BLOOM, Falcon, MPT, Persimmon, CodeGen, Mixtral, ESM, Nemotron, and Gemma and GPTBigCode with
multi-query attention, and MVP, an encoder-decoder),
`prepare(ratio=0.6)` with prune_neurons=0.3 and, separately, with prune_heads=0.5, counting the
neuron widths (FFNs) and head widths (attention blocks) found against the attentions in the graph
(scaled_dot_product_attention calls and attention written out as matmul or bmm and softmax). Training-free
and without export: what is recognized, not what it costs.

    python benchmarks/width_coverage.py                   # -> benchmarks/results/width_coverage.md
    python benchmarks/width_coverage.py --models hf-tiny:gpt2 timm:vit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from coverage import MODELS, RESULTS, build  # noqa: E402
from tests.graph_checks import tiny_hugging_face  # noqa: E402

import tunecomp_fx  # noqa: E402
from tunecomp_fx.errors import TunecompError  # noqa: E402
from tunecomp_fx.head_widths import attention_at  # noqa: E402

RATIO = 0.6
OPTIONS = {"neurons": {"prune_neurons": 0.3}, "heads": {"prune_heads": 0.5}}
SQUEEZE_EXCITATION = ["timm:efficientnet_b0", "torchvision:efficientnet_b0", "hf-tiny:efficientnet", "torchvision:mobilenet_v3_small", "timm:rexnet_100"]
GROUPED = ["torchvision:regnet_y_400mf", "torchvision:regnet_x_400mf", "timm:regnety_002", "torchvision:resnext50_32x4d"]
TINY_HF = ["hf-tiny:gpt2", "hf-tiny:gpt2-eager", "hf-tiny:llama", "hf-tiny:llama-mha", "hf-tiny:llama-eager", "hf-tiny:qwen3", "hf-tiny:phi3", "hf-tiny:phi3-gqa", "hf-tiny:opt", "hf-tiny:gpt-neox"]
PACKED_GATES = ["timm:gmixer_12_224"]  # GluMlp: the gated activation's two up sites packed in one, chunked (Phi-3's too)


def build_tiny_hf(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 2-layer GPT-2, LLaMA (rotary embeddings; "llama": grouped-query attention, 2 key/value heads
    for 4 query heads; "llama-mha": 4 of each), Qwen3 (LLaMA's with a norm of each query and key
    head) or Phi-3 (gate and up projections packed in one, chunked; query, key and value packed in one,
    sliced; 4 key/value heads, as Phi-3-mini; "phi3-gqa": 2 key/value heads for 4 query heads, as
    Phi-3-medium and Phi-4-mini), OPT (its query scaled by a number before the head split)
    or GPT-NeoX (each head's query, key and value side by side, a partial rotary embedding) at random
    initialization; "-eager": with Hugging Face's eager attention (matmul and softmax)
    in place of scaled_dot_product_attention; or Hugging Face's EfficientNet-B0 on 64 x 64 images."""
    import transformers

    torch.manual_seed(0)
    if name == "efficientnet":
        config = transformers.EfficientNetConfig(image_size=64, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280)
        return transformers.EfficientNetModel(config).eval(), {"pixel_values": torch.randn(2, 3, 64, 64)}
    name, eager, _ = name.partition("-eager")
    attention = "eager" if eager else "sdpa"
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, use_cache=False, attn_implementation=attention)
        model = transformers.GPT2Model(config)
    elif name == "gpt-neox":
        config = transformers.GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100,
            max_position_embeddings=32, use_cache=False, attn_implementation=attention,
        )  # fmt: skip
        model = transformers.GPTNeoXModel(config)
    elif name == "opt":
        config = transformers.OPTConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64, vocab_size=100,
            max_position_embeddings=32, use_cache=False, attn_implementation=attention,
        )  # fmt: skip
        model = transformers.OPTModel(config)
    elif name in ("phi3", "phi3-gqa"):
        config = transformers.Phi3Config(
            num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2 if name == "phi3-gqa" else 4,
            vocab_size=100, max_position_embeddings=32, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            attn_implementation=attention,
        )  # fmt: skip
        model = transformers.Phi3Model(config)
    elif name == "qwen3":
        config = transformers.Qwen3Config(
            num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=100, max_position_embeddings=32, use_cache=False, attn_implementation=attention,
        )  # fmt: skip
        model = transformers.Qwen3Model(config)
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4 if name == "llama-mha" else 2,
            vocab_size=100, max_position_embeddings=32, use_cache=False, attn_implementation=attention,
        )  # fmt: skip
        model = transformers.LlamaModel(config)
    return model.eval(), {"input_ids": torch.randint(0, 100, (2, 12))}


# More Hugging Face architectures at the same size, built from their default configuration by model type
# (tests.graph_checks.tiny_hugging_face, as the tests build them) with these options beside the common ones
AUTO_HF = {
    "mpnet": {}, "roformer": {}, "deberta-v2": {}, "modernbert": {"cls_token_id": 1, "sep_token_id": 2}, "olmo": {}, "olmo2": {},
    "gemma2": {"num_key_value_heads": 2, "head_dim": 16}, "gemma3_text": {"num_key_value_heads": 2, "head_dim": 16},
    "cohere": {"num_key_value_heads": 2}, "glm": {"num_key_value_heads": 2, "head_dim": 16}, "helium": {"num_key_value_heads": 2, "head_dim": 16},
    "starcoder2": {"num_key_value_heads": 2}, "granite": {"num_key_value_heads": 2},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 8}, "gptj": {"rotary_dim": 8},
    "xglm": {"d_model": 64, "ffn_dim": 128, "num_layers": 2}, "bloom": {"n_layer": 2, "n_head": 4},
    "falcon": {"num_kv_heads": 2, "new_decoder_architecture": True, "alibi": False},
    "mixtral": {"num_key_value_heads": 2, "num_local_experts": 4},
    "esm": {}, "nemotron": {"num_key_value_heads": 2, "head_dim": 16},
    "mvp": {"decoder_layers": 1, "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128},
    "gemma": {"num_key_value_heads": 1, "head_dim": 32},  # multi-query, as Gemma-2B
    "gpt_bigcode": {},  # multi-query by default, as StarCoder: one fused c_attn split in listed sizes
    "mpt": {},  # Wqkv(x).chunk(3, dim=2), ALiBi per head
    "persimmon": {},  # view(b, t, heads, 3, head_dim), each part selected; query and key normed head by head
    "albert": {},  # one layer's weights applied by both layers: one width per kind, the same neurons kept at each call
    "codegen": {"rotary_dim": 8},  # qkv_proj(x).view(b, t, -1, 3 * local).split(local, dim=-1): 4 model-parallel groups, each pruned whole
}  # fmt: skip


def _shape(ups: tuple[str, ...], parts: tuple[int, ...], repeats: tuple[tuple[int, ...], ...]) -> str:
    """"2 ups", or "1 up in 3 parts", "2 ups in 1+2 parts" when a site holds several copies of the width,
    and "key/value heads repeated 2x" with grouped-query attention ("one key/value head shared by every
    query head" with multi-query attention)."""
    described = f"{len(ups)} up{'s' * (len(ups) > 1)}"
    if any(part > 1 for part in parts):
        described += f" in {'+'.join(map(str, parts))} parts"
    if any(0 in part for part in repeats):
        return described + ", one key/value head shared by every query head"
    return described + (f", key/value heads repeated {max(max(part) for part in repeats)}x" if repeats else "")


def survey(spec: str) -> dict:
    source, name = spec.split(":", 1)
    builders = {"hf-tiny": build_tiny_hf, "hf-auto": lambda model_type: tiny_hugging_face(model_type, **AUTO_HF[model_type])}
    model, inputs = builders[source](name) if source in builders else build(spec)[:2]
    row: dict = {"model": spec}
    for kind, options in OPTIONS.items():
        start = time.perf_counter()
        try:
            prepared = tunecomp_fx.prepare(model, inputs, RATIO, **options)
        except TunecompError as error:
            row[kind] = f"0 ({type(error).__name__}: none recognized)"
            continue
        finally:
            row[f"{kind}_s"] = time.perf_counter() - start
        context = prepared.meta["tunecomp"].context
        found = [width for width in context.hidden_widths if width.kind == kind]
        shapes = sorted({_shape(width.ups, width.parts, width.repeats) for width in found})
        squeezed = sum(bool(width.squeezes) for width in found)
        groups = "/".join(str(size) for size in sorted({width.group for width in found if kind == "neurons" and width.group > 1}))
        calls = sum(len(width.betweens) for width in found if width.more_between)
        row[kind] = (
            f"{len(found)} ({'; '.join(shapes)}{f'; {squeezed} through a squeeze-excitation' if squeezed else ''}"
            f"{f'; pruned in groups of {groups} channels' if groups else ''}{f'; at {calls} calls of shared layers' if calls else ''})"
        )
        teachers = [n for n in prepared.graph.nodes if n.meta.get("tunecomp", {}).get("role") != "hidden" and attention_at(prepared, n)]
        row["attentions"] = len(teachers)
        row.setdefault("sites", len(context.compressed_sites))
    return row


def markdown(rows: list[dict], seconds: float) -> str:
    lines = [
        "# Hidden widths found: prune_neurons=0.3 and prune_heads=0.5 (separately), prepare at ratio 0.6",
        "",
        f"Command: `python benchmarks/width_coverage.py` (torch {torch.__version__}); {seconds / 60:.0f} min. Random "
        "initialization except all-MiniLM-L6-v2. `attentions`: scaled_dot_product_attention calls and attention "
        "written out as matmul (or bmm), softmax and matmul in the graph; `compressed sites`: with prune_neurons where it succeeds (the "
        "convolutions of a squeeze-excitation inside a pruned width are sliced with it, not compressed); \"in groups of N channels\": "
        "a grouped convolution in the width, whose groups are pruned whole; a model whose prepare fails for the pruning option shows 0 and the error "
        "(\"none recognized\": no width of the patterns in README's prune_neurons and prune_heads).",
        "",
        "| model | compressed sites | neuron widths | attentions | head widths |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row.get('sites', '-')} | {row['neurons']} | {row.get('attentions', '-')} | {row['heads']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[*MODELS, *SQUEEZE_EXCITATION, *GROUPED, *PACKED_GATES, *TINY_HF, *(f"hf-auto:{t}" for t in AUTO_HF)])
    parser.add_argument("--output", type=Path, default=RESULTS / "width_coverage.md")
    args = parser.parse_args()
    start, rows = time.perf_counter(), []
    for spec in args.models:
        rows.append(survey(spec))
        print(rows[-1], flush=True)
    args.output.write_text(markdown(rows, time.perf_counter() - start))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
