"""PNG plots where a table is hard to read: rank allocation per site, the blend and distillation
schedules, training loss and eval curves. Each takes plain data (a report, lists of numbers, a list
of dicts) so that any loop can call it, and returns the path written.

Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot global state, no
display needed, and the user's own backend choice is left alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tunecomp_fx.errors import InputError
from tunecomp_fx.report import CompressionReport

_DPI = 110


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))
    return path


def plot_rank_allocation(report: CompressionReport, path: str | Path) -> Path:
    """Per site: the kept rank against the break-even rank and the full rank (top), and the kept
    fraction of parameters against the target (bottom). Sites left dense are drawn at full rank, grey."""
    rows = list(report.sites)
    if not rows:
        raise InputError("the report has no sites to plot")
    positions = list(range(len(rows)))
    full = [min(r.out_features, r.in_features) for r in rows]
    factorized = [r.rank is not None for r in rows]
    figure = Figure(figsize=(max(8.0, 0.22 * len(rows) + 2.0), 7.0), dpi=_DPI)
    ranks, kept = figure.subplots(2, 1, sharex=True)
    ranks.bar(positions, full, color="#eeeeee", edgecolor="#bbbbbb", label="full rank")
    ranks.bar(
        positions,
        [r.rank if r.rank is not None else f for r, f in zip(rows, full)],
        color=["#3182bd" if f else "#969696" for f in factorized],
        label="kept rank (blue) / left dense (grey)",
    )
    ranks.scatter(positions, [r.break_even_rank for r in rows], marker="_", s=120, color="#de2d26", zorder=3, label="break-even rank")
    ranks.set_ylabel("rank")
    ranks.set_title(f"Rank allocation, ratio={report.ratio} ({sum(factorized)} of {len(rows)} sites factorized)")
    ranks.legend(loc="upper right", fontsize=8)
    kept.bar(positions, [r.kept_fraction for r in rows], color=["#3182bd" if f else "#969696" for f in factorized])
    kept.axhline(1.0 - report.ratio, color="#de2d26", linestyle="--", label=f"target {1 - report.ratio:.2f}")
    kept.axhline(report.kept_fraction, color="#31a354", linestyle=":", label=f"achieved {report.kept_fraction:.3f}")
    kept.set_ylabel("kept fraction of params")
    kept.set_ylim(0, 1.05)
    kept.legend(loc="upper right", fontsize=8)
    kept.set_xticks(positions, [r.name for r in rows], rotation=90, fontsize=7)
    return _save(figure, path)


def plot_schedules(
    steps: Sequence[float],
    alpha: Sequence[float],
    beta: Sequence[float],
    path: str | Path,
    *,
    distill_weight: Sequence[float] | None = None,
    lr_factor: Sequence[float] | None = None,
) -> Path:
    """The blend weights alpha (teacher) and beta (student) per step, and, each in a panel of its own,
    the distillation weight and the learning rate (as a multiple of the peak)."""
    # Panels below the blend's, as (label, values, line style, colour): on the blend's axes the
    # distillation weight (w * alpha) would hide under alpha when w = 1.
    candidates = (
        ("distillation weight", distill_weight, ":", "tab:green"),
        ("learning rate (x peak)", lr_factor, "-.", "tab:purple"),
    )
    extra = [panel for panel in candidates if panel[1] is not None]
    for label, values, *_ in [("alpha (teacher)", alpha), ("beta (student)", beta), *extra]:
        if len(values) != len(steps):
            raise InputError(f"{label} has {len(values)} values for {len(steps)} steps; give one value per step")
    if not steps:
        raise InputError("no steps to plot")
    figure = Figure(figsize=(7.0, 2.5 + 1.5 * (1 + len(extra))), dpi=_DPI)
    axes = figure.subplots(1 + len(extra), 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(steps, alpha, "-", linewidth=2, label="alpha (teacher)")
    axes[0].plot(steps, beta, "--", linewidth=2, label="beta (student)")
    axes[0].set_ylabel("blend weight")
    axes[0].set_title("Training schedules")
    for panel, (label, values, style, colour) in zip(axes[1:], extra):
        panel.plot(steps, values, style, linewidth=2, color=colour, label=label)
        panel.set_ylabel(label)
    for panel in axes:
        panel.grid(alpha=0.3)
        panel.legend()
    axes[-1].set_xlabel("step")
    return _save(figure, path)


def plot_training_curves(history: Sequence[Mapping[str, float | None]], path: str | Path, *, metric: str = "eval") -> Path:
    """Training loss per step and, from the entries that have one, the eval metric; `history` is a
    list of {"step": int, "loss": float, metric: float or None} (extra keys are ignored)."""
    if not history:
        raise InputError("the training history is empty")
    missing = [i for i, entry in enumerate(history) if "step" not in entry or "loss" not in entry]
    if missing:
        raise InputError(f"history entries {missing[:5]} lack 'step' or 'loss'; each entry is {{step, loss, {metric}}}")
    evals = [(e["step"], e[metric]) for e in history if e.get(metric) is not None]
    figure = Figure(figsize=(7.0, 6.0 if evals else 3.5), dpi=_DPI)
    axes = figure.subplots(2 if evals else 1, 1, sharex=True, squeeze=False)[:, 0]
    steps = [e["step"] for e in history]
    axes[0].plot(steps, [e["loss"] for e in history], color="#3182bd", linewidth=1.5)
    axes[0].set_ylabel("training loss")
    axes[0].set_title("Training")
    axes[0].grid(alpha=0.3)
    if evals:
        axes[1].plot([s for s, _ in evals], [v for _, v in evals], "o-", color="#31a354")
        axes[1].set_ylabel(metric)
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return _save(figure, path)


def plot_joint_training(training: Mapping[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """schedules.png and training.png in `folder`, from what the joint driver records in
    `compact.meta[tunecomp_fx.train.TRAINING_KEY]`: {"config": TrainingConfig dict, "history": [...],
    "metric": name of the eval metric in the history}."""
    from tunecomp_fx.train import TrainingConfig

    history = training.get("history") or []
    if not history:
        raise InputError("the joint run recorded no history to plot")
    total = int(history[-1]["step"])
    schedules = TrainingConfig.from_dict(training["config"]).schedules(total)
    steps = list(range(total + 1))
    folder = Path(folder)
    return (
        plot_schedules(
            steps, [schedules.alpha(t) for t in steps], [schedules.beta(t) for t in steps], folder / "schedules.png",
            distill_weight=[schedules.distill(t) for t in steps], lr_factor=[schedules.lr_factor(t) for t in steps],
        ),
        plot_training_curves(history, folder / "training.png", metric=training.get("metric", "eval")),
    )
