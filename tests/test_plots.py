"""Plots are written as valid PNG images of non-trivial size and content."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tunecomp_fx
from tunecomp_fx.plots import plot_rank_allocation, plot_schedules, plot_training_curves
from tunecomp_fx.report import CompressionReport, SiteRow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_real_png(path: Path, min_width: int, min_height: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 15_000  # axes, bars, labels: far more than a blank canvas
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50  # anti-aliased lines and text in several colours, not a flat fill


def _report() -> CompressionReport:
    rows = [
        SiteRow(f"blocks.{i}.{name}", "call_module", out, inp, "rank", rank, out * inp + out, rank * (out + inp) + out, 197 * out * inp, 197 * rank * (out + inp))
        for i in range(4)
        for name, out, inp, rank in (("attn.qkv", 576, 192, 88), ("mlp.fc1", 768, 192, 88), ("mlp.fc2", 192, 768, 96))
    ]
    rows.append(SiteRow("head", "call_module", 10, 192, "excluded", None, 1930, 1930, 1920, 1920, "excluded by the user's pattern"))
    return CompressionReport(0.4, "symbolic_trace", "ok", tuple(rows), 10**6, 6 * 10**5, 10**9, 6 * 10**8)


def test_rank_allocation_plot(tmp_path: Path) -> None:
    path = plot_rank_allocation(_report(), tmp_path / "sub" / "ranks.png")
    assert path == tmp_path / "sub" / "ranks.png"
    _assert_real_png(path, 800, 600)


def test_schedule_plot_with_synthetic_schedules(tmp_path: Path) -> None:
    total = 200
    steps = list(range(total + 1))
    alpha = [max(0.0, 1 - math.sin(math.pi * t / (2 * total))) for t in steps]
    beta = [math.sqrt(1 - a * a) for a in alpha]
    distill = [a for a in alpha]  # weight 1: the same curve as alpha
    path = plot_schedules(steps, alpha, beta, tmp_path / "schedules.png", distill_weight=distill)
    _assert_real_png(path, 600, 350)
    with Image.open(path) as image:  # the distillation weight (green) is drawn in its own lower panel, not under alpha
        pixels = np.asarray(image.convert("RGB")).astype(int)
    green = (np.abs(pixels - np.array([44, 160, 44])).sum(axis=-1) < 40).nonzero()[0]
    assert len(green) > 200 and green.min() > pixels.shape[0] // 2
    with pytest.raises(tunecomp_fx.InputError, match="beta \\(student\\) has 3 values for 201 steps"):
        plot_schedules(steps, alpha, beta[:3], tmp_path / "bad.png")


def test_schedule_plot_draws_the_learning_rate_in_a_panel_below_the_distillation_weight(tmp_path: Path) -> None:
    schedules = tunecomp_fx.TrainingConfig(steps=200, warmup=10, blend_steps=100, lr_decay="cosine_after_blend").schedules(200)
    steps = list(range(201))
    path = plot_schedules(
        steps, [schedules.alpha(t) for t in steps], [schedules.beta(t) for t in steps], tmp_path / "schedules.png",
        distill_weight=[schedules.distill(t) for t in steps], lr_factor=[schedules.lr_factor(t) for t in steps],
    )  # fmt: skip
    _assert_real_png(path, 600, 500)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    rows = {
        colour: (np.abs(pixels - np.array(rgb)).sum(axis=-1) < 40).nonzero()[0]
        for colour, rgb in {"green": (44, 160, 44), "purple": (148, 103, 189)}.items()
    }
    assert len(rows["purple"]) > 200 and rows["purple"].min() > rows["green"].max()
    with pytest.raises(tunecomp_fx.InputError, match="learning rate \\(x peak\\) has 2 values for 201 steps"):
        plot_schedules(steps, steps, steps, tmp_path / "bad.png", lr_factor=[1.0, 1.0])


def test_training_curve_plot_with_synthetic_history(tmp_path: Path) -> None:
    history = [{"step": s, "loss": 2.0 * math.exp(-s / 60) + 0.1, "eval": (0.5 + s / 400 if s % 50 == 0 else None)} for s in range(201)]
    _assert_real_png(plot_training_curves(history, tmp_path / "training.png"), 600, 500)
    with pytest.raises(tunecomp_fx.InputError, match="lack 'step' or 'loss'"):
        plot_training_curves([{"step": 0}], tmp_path / "bad.png")
    with pytest.raises(tunecomp_fx.InputError, match="empty"):
        plot_training_curves([], tmp_path / "bad.png")
