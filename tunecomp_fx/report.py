"""The compression report: per-site decisions and totals, as a table, a dict, JSON or markdown."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SiteRow:
    name: str
    form: str
    out_features: int
    in_features: int
    decision: str  # "rank N", "dense", "excluded", "shared"
    rank: int | None
    params_before: int
    params_after: int
    macs_before: int  # per example
    macs_after: int
    reason: str = ""
    init_error: float | None = None  # ||(W - BA) X|| / ||W X|| of the initialized student, on calibration data

    @property
    def kept_fraction(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0


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

    @property
    def compressed_rows(self) -> list[SiteRow]:
        return [row for row in self.sites if row.decision not in ("excluded", "shared")]

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
        data["totals"] = self.totals()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        values = {k: v for k, v in data.items() if k != "totals"}
        values["sites"] = tuple(SiteRow(**row) for row in data["sites"])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def _table_rows(self) -> list[list[str]]:
        rows = []
        for row in self.sites:
            decision = f"rank {row.rank}" if row.rank is not None else row.decision
            decision += f" ({row.reason})" if row.reason else ""
            rows.append(
                [
                    row.name,
                    f"{row.out_features}x{row.in_features}",
                    decision,
                    f"{row.params_before:,}",
                    f"{row.params_after:,}",
                    f"{row.kept_fraction:.3f}",
                    "-" if row.init_error is None else f"{row.init_error:.3g}",
                ]
            )
        return rows

    _HEADER = ["site", "shape", "decision", "params before", "params after", "kept", "init error"]

    def _summary_lines(self) -> list[str]:
        return [
            f"capture: {self.capture_path} ({self.capture_reason})",
            f"compressed sites: {len(self.compressed_rows)} of {len(self.sites)}; "
            f"kept fraction {self.kept_fraction:.4f} (target {1 - self.ratio:.4f}, ratio={self.ratio})",
            f"whole model: params {self.model_params_before:,} -> {self.model_params_after:,} "
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

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self._HEADER) + " |", "|" + "---|" * len(self._HEADER)]
        lines += ["| " + " | ".join(cells) + " |" for cells in self._table_rows()]
        return "\n".join(lines + [""] + [f"- {line}" for line in self._summary_lines()]) + "\n"

    def __str__(self) -> str:
        rows = [self._HEADER] + self._table_rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEADER))]
        text = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
        text.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(text + [""] + self._summary_lines())
