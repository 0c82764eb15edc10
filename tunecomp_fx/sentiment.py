"""The real task of the demo and the benchmark: the pretrained all-MiniLM-L6-v2 with a new head,
fine-tuned for Rotten Tomatoes sentiment (both installed offline, DESIGN.md section 7), and the
ONNX Runtime latency of its compressed versions.

Every batch is padded to one fixed `max_length`, so that calibration, training, evaluation and the
latency measurement all see one sequence length (the torch.export capture itself keeps the batch and
sequence dimensions dynamic).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from tunecomp_fx.data import TextCollator, load_minilm_classifier, load_rotten_tomatoes, tokenize


@dataclass
class SentimentTask:
    model: nn.Module  # pretrained MiniLM with a freshly initialized 2-way head, eval mode
    train: DataLoader  # shuffled with a seeded generator
    test: DataLoader
    example: dict[str, torch.Tensor]  # two texts (batch 1 would make torch.export specialize the batch dim)
    calibration: list[dict[str, torch.Tensor]]
    max_length: int


def sentiment_task(
    *, max_length: int = 32, batch_size: int = 16, seed: int = 0, calibration_batches: int = 4,
    train_limit: int | None = None, test_limit: int | None = None,
) -> SentimentTask:
    """The fixed split of load_rotten_tomatoes(seed=0); `*_limit` keep the first texts (for smoke tests)."""
    splits = load_rotten_tomatoes(seed=0)
    model, tokenizer = load_minilm_classifier(seed=seed)
    collate = TextCollator(tokenizer, max_length, fixed_length=True)
    train_set = torch.utils.data.Subset(splits.train, range(min(train_limit or len(splits.train), len(splits.train))))
    test_set = torch.utils.data.Subset(splits.test, range(min(test_limit or len(splits.test), len(splits.test))))
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(train_set, batch_size, shuffle=True, drop_last=True, collate_fn=collate, generator=generator)
    test = DataLoader(test_set, 128, collate_fn=collate)
    texts = splits.train.texts
    calibration = [
        tokenize(tokenizer, texts[i * batch_size : (i + 1) * batch_size], max_length, fixed_length=True)
        for i in range(calibration_batches)
    ]
    example = tokenize(tokenizer, texts[:2], max_length, fixed_length=True)
    return SentimentTask(model, train, test, example, calibration, max_length)


def onnx_latency(
    models: Mapping[str, nn.Module], example: Mapping[str, torch.Tensor], folder: str | Path, *,
    baseline: str, batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 10, threads: int = 1,
    translations: Mapping[str, Mapping[Any, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Export each model to `folder/<label>.onnx` (with `translations[label]`, to_onnx's, where given)
    and time them interleaved in ONNX Runtime at each batch size:
    {label: {"batch<B>_ms": median, "batch<B>_speedup": baseline median / median}}."""
    from tunecomp_fx import export

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {label: folder / f"{label}.onnx" for label in models}
    for label, model in models.items():
        export.to_onnx(model, dict(example), paths[label], translations=(translations or {}).get(label))
    results: dict[str, dict[str, Any]] = {label: {} for label in models}
    for size in batch_sizes:
        inputs = {name: value[:1].expand(size, *value.shape[1:]).contiguous().cpu().numpy() for name, value in example.items()}
        comparison = export.compare_latency(paths, inputs, baseline=baseline, repeats=repeats, threads=threads, warmup=2)
        for label, result in comparison.results.items():
            results[label][f"batch{size}_ms"] = result.median_ms
            results[label][f"batch{size}_speedup"] = comparison.speedups[label]
    return results
