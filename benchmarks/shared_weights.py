"""Weights that several linear calls share, or that embedding lookups read too, compressed with one
student each against left dense (as before tunecomp-fx compressed them), on base-size Hugging Face
configurations at random init (nothing is downloaded): ALBERT-base (one layer's weights applied by all
12 layers), DeBERTa-v3-base (each layer's query_proj and key_proj also project the relative
embeddings) and GPT-2 (small) with its language-model head, tied to its token embedding.

Every form is training-free `compress` at one ratio; "dense" excludes the layers called more than
once (found by counting module calls on the example inputs) and the layers whose weight an embedding
holds too, which is what became of them before.
ALBERT also prunes its shared layer's FFN neurons and attention heads (`WIDTH_PRUNING`), the same
ones at every call. Parameters, MACs and ONNX Runtime latency against the original, interleaved in
one run.

    .venv/bin/python benchmarks/shared_weights.py                    # all three models, ratio 0.4
    .venv/bin/python benchmarks/shared_weights.py --models albert --ratio 0.5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import tunecomp_fx
from tunecomp_fx.export import compare_latency, to_onnx

BASE = {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072, "num_hidden_layers": 12}  # the configs' defaults are larger
CONFIGS: dict[str, dict[str, Any]] = {
    "albert": {**BASE, "embedding_size": 128},  # albert-base-v2: one layer's weights applied by all 12 layers
    "deberta-v2": {  # deberta-v3-base
        **BASE, "vocab_size": 128100, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 256,
        "max_relative_positions": -1, "share_att_key": True, "norm_rel_ebd": "layer_norm", "position_biased_input": False,
    },
    "gpt2": {"use_cache": False},  # gpt2 (small): lm_head tied to the token embedding wte, 50257 x 768
}  # fmt: skip
HEADS = {"gpt2": transformers.AutoModelForCausalLM}  # the model with its tied head; the others without a head
# the widths of ALBERT's shared layer (DeBERTa-v3's shared query_proj and key_proj feed relative position terms, whose heads are not pruned)
WIDTH_PRUNING: dict[str, dict[str, float]] = {"albert": {"prune_neurons": 0.3, "prune_heads": 0.5}}


def linear_calls(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Counter[str]:
    """How many times each nn.Linear of `model` runs in one forward on `inputs`."""
    calls: Counter[str] = Counter()
    handles = [
        module.register_forward_hook(lambda module, args, output, name=name: calls.update([name]))
        for name, module in model.named_modules() if isinstance(module, nn.Linear)
    ]  # fmt: skip
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return calls


def tied_to_embeddings(model: nn.Module) -> list[str]:
    """The nn.Linear modules of `model` whose weight an nn.Embedding holds too."""
    tables = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and id(module.weight) in tables]


def measure(model_type: str, ratio: float, tokens: int, batches: list[int], repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type])
    model = HEADS.get(model_type, transformers.AutoModel).from_config(config).eval()
    inputs = {"input_ids": torch.randint(3, 1000, (8, tokens))}
    shared = sorted({name for name, count in linear_calls(model, inputs).items() if count > 1} | set(tied_to_embeddings(model)))
    result: dict[str, Any] = {"model": model_type, "ratio": ratio, "tokens": tokens, "shared_layers": shared, "forms": {}, "original_ms": {}}
    forms: dict[str, dict[str, Any]] = {"one student per shared weight": {}}
    if model_type in WIDTH_PRUNING:
        pruning = WIDTH_PRUNING[model_type]
        forms[f"one student per shared weight, {', '.join(f'{key}={value}' for key, value in pruning.items())}"] = pruning
    forms["shared weights dense"] = {"exclude": tuple(shared)}
    compacts = {}
    for form, options in forms.items():
        start = time.perf_counter()
        compacts[form] = tunecomp_fx.compress(model, inputs, ratio=ratio, progress=True, **options)
        report = tunecomp_fx.get_report(compacts[form])
        print(f"\n{model_type}, {form}: {time.perf_counter() - start:.0f} s\n{report}")
        result["forms"][form] = {
            "compress_seconds": time.perf_counter() - start,
            "compressed_sites": len(report.compressed_rows),
            "sites_params_before": sum(row.params_before for row in report.compressed_rows),
            "params_before": report.model_params_before,
            "params_after": report.model_params_after,
            "param_ratio": report.param_ratio,
            "mac_ratio": report.mac_ratio,
            "latency": {},
        }
    with tempfile.TemporaryDirectory() as folder:
        paths = {label: Path(folder) / f"model{index}.onnx" for index, label in enumerate(["original", *compacts])}
        for label, module in (("original", model), *compacts.items()):
            exported = to_onnx(module, {"input_ids": inputs["input_ids"][:2]}, paths[label])
            print(f"{label}: exported with {exported.exporter}, max ORT error {max(exported.max_errors.values()):.2e}")
        for batch in batches:
            feed = {"input_ids": torch.randint(3, 1000, (batch, tokens)).numpy()}
            comparison = compare_latency(paths, feed, baseline="original", repeats=repeats, progress=True)
            result["original_ms"][batch] = comparison.results["original"].median_ms
            for form, row in result["forms"].items():
                row["latency"][batch] = {"ms": comparison.results[form].median_ms, "speedup": comparison.speedups[form]}
    return result


def table(results: list[dict[str, Any]], batches: list[int]) -> str:
    speedups = " | ".join(f"ORT speedup b{batch}" for batch in batches)
    lines = [
        f"| model | form | compressed sites (their params) | params | MACs | {speedups} |",
        "|---|---|---|---|---|" + "---|" * len(batches),
    ]
    for result in results:
        for form, row in result["forms"].items():
            latency = " | ".join(f"x{row['latency'][batch]['speedup']:.2f}" for batch in batches)
            lines.append(
                f"| {result['model']} at {result['ratio']} | {form} | {row['compressed_sites']} ({row['sites_params_before'] / 1e6:.1f}M) "
                f"| {row['params_before'] / 1e6:.1f}M -> {row['params_after'] / 1e6:.1f}M (x{row['param_ratio']:.3f}) | x{row['mac_ratio']:.3f} | {latency} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8", help="ONNX Runtime batch sizes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    batches = [int(batch) for batch in args.batches.split(",")]
    results = [measure(model_type, args.ratio, args.tokens, batches, args.repeats) for model_type in args.models]
    markdown = table(results, batches)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_weights.json").write_text(json.dumps(results, indent=2))
    (args.out / "shared_weights.md").write_text(
        f"`python benchmarks/shared_weights.py --ratio {args.ratio} --tokens {args.tokens} --batches {args.batches}` "
        f"(random init, training-free; latency interleaved with the original in one run)\n\n{markdown}\n"
    )


if __name__ == "__main__":
    main()
