"""The compression report: per-site decisions and totals, as a table, a dict, JSON or markdown."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunecomp_fx.pipeline import PassRecord
from tunecomp_fx.schedules import steps_of


# Decisions of sites the passes leave as they are: excluded by the user, shared or tied weights,
# hidden from the captured graph (inside a leaf module), a bias computed from the input, or inside
# a pruned width (a squeeze-excitation's layer, sliced with the width and otherwise dense).
LEFT_ALONE = ("excluded", "shared", "hidden", "unsupported", "in_width")


@dataclass(frozen=True)
class SiteRow:
    name: str
    form: str
    out_features: int
    in_features: int
    decision: str  # "rank", "dense", "removed", or why the site is left alone (LEFT_ALONE)
    rank: int | None
    params_before: int
    params_after: int
    macs_before: int | None  # per example; None where calibration saw no input of the site's own (hidden in a leaf)
    macs_after: int | None
    reason: str = ""
    layout: str = "linear"  # "linear", "conv1x1" or "pointwise_conv1d" (a pointwise convolution)
    init_error: float | None = None  # ||(W - BA) X|| / ||W X|| of the initialized student, on calibration data

    @property
    def kept_fraction(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def break_even_rank(self) -> int:
        """Smallest rank at which a factorization holds as many weights as the dense matrix."""
        m, n = self.out_features, self.in_features
        return -(-(m * n) // (m + n))


@dataclass(frozen=True)
class CompressionReport:
    ratio: float
    capture_path: str
    capture_reason: str
    sites: tuple[SiteRow, ...]
    model_params_before: int
    model_params_after: int
    model_macs_before: int
    model_macs_after: int
    pass_seconds: dict[str, float] = field(default_factory=dict)
    pass_log: tuple[PassRecord, ...] = ()  # every pass in order, with the nodes it added and removed

    @property
    def compressed_rows(self) -> list[SiteRow]:
        return [row for row in self.sites if row.decision not in LEFT_ALONE]

    @property
    def kept_fraction(self) -> float:
        """Kept parameters of the compressed sites over their dense size (target: 1 - ratio)."""
        rows = self.compressed_rows
        return sum(r.params_after for r in rows) / max(sum(r.params_before for r in rows), 1)

    @property
    def param_ratio(self) -> float:
        return self.model_params_after / max(self.model_params_before, 1)

    @property
    def mac_ratio(self) -> float:
        return self.model_macs_after / max(self.model_macs_before, 1)

    def totals(self) -> dict[str, float]:
        return {
            "target_kept_fraction": 1.0 - self.ratio,
            "kept_fraction": self.kept_fraction,
            "param_ratio": self.param_ratio,
            "mac_ratio": self.mac_ratio,
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sites"] = [asdict(row) for row in self.sites]
        data["pass_log"] = [asdict(record) for record in self.pass_log]
        data["totals"] = self.totals()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        values = {k: v for k, v in data.items() if k not in ("totals", "training")}
        values["sites"] = tuple(SiteRow(**row) for row in data["sites"])
        values["pass_log"] = tuple(
            PassRecord(r["name"], r["seconds"], tuple(r["added"]), tuple(r["removed"])) for r in data.get("pass_log", ())
        )
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, folder: str | Path, training: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
        """Write report.json and report.md into `folder`; returns their paths. `training` is what the
        joint driver records (config, per-step history): saved under "training" and summarized."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, markdown_path = folder / "report.json", folder / "report.md"
        data = self.to_dict() if training is None else {**self.to_dict(), "training": dict(training)}
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        markdown = self.to_markdown()
        if training is not None:
            markdown += "\n## Training\n\n" + "\n".join(f"- {line}" for line in training_summary(training)) + "\n"
        markdown_path.write_text(markdown)
        return json_path, markdown_path

    _HEADER = ["site", "shape", "rank", "kept", "params before", "params after", "MACs before", "MACs after", "init error", "note"]
    _LEFT_ALIGNED = {0, 1, 9}

    def _table_rows(self) -> list[list[str]]:
        rows = []
        for row in self.sites:
            if row.rank is not None:  # a reason here says what neuron pruning kept (the shape is the unpruned one)
                note = row.reason or f"break-even rank {row.break_even_rank}"
            else:
                note = f"{row.decision}: {row.reason}" if row.reason else row.decision
            rows.append(
                [
                    row.name,
                    f"{row.out_features}x{row.in_features}",
                    str(row.rank) if row.rank is not None else "-",
                    f"{row.kept_fraction:.3f}",
                    f"{row.params_before:,}",
                    f"{row.params_after:,}",
                    _human(row.macs_before),
                    _human(row.macs_after),
                    "-" if row.init_error is None else f"{row.init_error:.3g}",
                    note,
                ]
            )
        return rows

    def _summary_lines(self) -> list[str]:
        rows = self.compressed_rows
        site_macs_before = sum(r.macs_before or 0 for r in rows)  # known for every compressed site
        site_macs_after = sum(r.macs_after or 0 for r in rows)
        return [
            f"capture: {self.capture_path} ({self.capture_reason})",
            f"compressed sites: {len(rows)} of {len(self.sites)}; "
            f"kept fraction {self.kept_fraction:.4f} (target {1 - self.ratio:.4f}, ratio={self.ratio})",
            f"compressed sites' MACs per example: {_human(site_macs_before)} -> {_human(site_macs_after)}",
            f"whole model on the example inputs: params {self.model_params_before:,} -> {self.model_params_after:,} "
            f"(x{self.param_ratio:.3f}); MACs {self.model_macs_before:,} -> {self.model_macs_after:,} "
            f"(x{self.mac_ratio:.3f})",
        ] + self._init_error_lines()

    def _init_error_lines(self) -> list[str]:
        errors = [row.init_error for row in self.sites if row.init_error is not None]
        if not errors:
            return []
        return [
            f"initialized students reproduce their teachers within a relative error ||(W - BA) X|| / ||W X|| "
            f"of {max(errors):.3g} (mean {sum(errors) / len(errors):.3g}) on the calibration data"
        ]

    def pass_table(self) -> list[list[str]]:
        header = ["pass", "seconds", "nodes added", "nodes removed"]
        return [header] + [[r.name, f"{r.seconds:.2f}", str(len(r.added)), str(len(r.removed))] for r in self.pass_log]

    def to_markdown(self) -> str:
        lines = ["# Compression report", "", *[f"- {line}" for line in self._summary_lines()], "", "## Sites", ""]
        lines += _markdown_table([self._HEADER] + self._table_rows())
        if self.pass_log:
            lines += ["", "## Passes", ""] + _markdown_table(self.pass_table())
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return "\n".join(format_table([self._HEADER] + self._table_rows(), self._LEFT_ALIGNED) + [""] + self._summary_lines())


def training_summary(training: Mapping[str, Any]) -> list[str]:
    """Lines describing a joint run from what the driver records: its length and recipe, the loss
    at the start and the end, and the last evaluation."""
    config, history = training["config"], training["history"]
    metric = training.get("metric", "eval")
    if not history:
        return ["joint training: no steps recorded"]
    total = history[-1]["step"]
    lines = [
        f"joint training: {total} steps, lr {config['lr']:g}, {config['blend']} blend ({config['blend_mix']} mix) from teacher to student over "
        f"the first {steps_of(config['blend_steps'], total)}, distillation weight {config['distill_weight']:g}"
    ]
    if config.get("prune_steps") is not None:  # absent from reports written before prune_steps existed
        lines[0] += f", students pruned to the budget over the first {steps_of(config['prune_steps'], total)}"
    if training.get("data"):
        loss = f", loss {training['loss']}" if training.get("loss") else ""
        lines.append(f"data: {training['data']}{loss}" + (f"; evaluated on {training['eval_data']}" if training.get("eval_data") else ""))
    lines.append(f"training loss {history[0]['loss']:.4g} (step 1) -> {history[-1]['loss']:.4g} (step {total})")
    evaluated = [entry for entry in history if entry.get(metric) is not None]
    if evaluated:
        lines.append(f"{metric} {evaluated[-1][metric]:.4f} at step {evaluated[-1]['step']} ({len(evaluated)} evaluations)")
    return lines


def format_table(rows: list[list[str]], left_aligned: Collection[int] = (0,)) -> list[str]:
    """A plain-text table: the first row is the header, underlined; numbers are right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i in left_aligned else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _markdown_table(rows: list[list[str]]) -> list[str]:
    cells = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    return ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])] + ["| " + " | ".join(r) + " |" for r in cells[1:]]


def _human(count: int | None) -> str:
    """1234567 -> '1.23M': MAC counts read at a glance ('-' for an unknown count)."""
    if count is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)
