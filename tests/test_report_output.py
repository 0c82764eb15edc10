"""The report's table, markdown and JSON forms, and their round trip."""

from __future__ import annotations

import json
from pathlib import Path

from tunecomp_fx import TrainingConfig
from tunecomp_fx.pipeline import PassRecord
from tunecomp_fx.report import CompressionReport, SiteRow, training_summary


def _report() -> CompressionReport:
    rows = (
        SiteRow("blocks.0.mlp.fc1", "call_module", 768, 192, "rank", 88, 148_224, 85_248, 197 * 768 * 192, 197 * 88 * 960, init_error=0.1234),
        SiteRow("blocks.0.mlp.fc2", "aten.linear", 192, 768, "dense", None, 147_648, 147_648, 197 * 768 * 192, 197 * 768 * 192, "kept rank past break-even after pruning"),
        SiteRow("head", "F.linear", 10, 192, "excluded", None, 1_930, 1_930, 1_920, 1_920, "excluded by the user's pattern"),
        # a layer inside a leaf module: calibration saw no input of its own, so its MACs are unknown
        SiteRow("attn.out_proj", "call_module", 192, 192, "hidden", None, 37_056, 37_056, None, None, "inside leaf module 'attn'"),
    )
    log = (PassRecord("insert_teacher_student", 0.5, ("down", "up"), ()), PassRecord("fold_blends", 0.25, (), ("teacher",)))
    return CompressionReport(0.4, "symbolic_trace", "symbolic tracing succeeded", rows, 400_000, 340_000, 60_000_000, 50_000_000, {"x": 1.0}, log)


def test_table_has_macs_ranks_and_reasons() -> None:
    text = str(_report()).splitlines()
    assert text[0].split() == ["site", "shape", "rank", "kept", "params", "before", "params", "after", "MACs", "before", "MACs", "after", "init", "error", "note"]
    assert text[2].split() == ["blocks.0.mlp.fc1", "768x192", "88", "0.575", "148,224", "85,248", "29M", "16.6M", "0.123", "break-even", "rank", "154"]
    assert text[3].endswith("29M           -  dense: kept rank past break-even after pruning")
    assert text[4].endswith("1.92k           -  excluded: excluded by the user's pattern")
    assert text[5].split()[4:] == ["37,056", "37,056", "-", "-", "-", "hidden:", "inside", "leaf", "module", "'attn'"]
    assert "compressed sites: 2 of 4; kept fraction 0.7872 (target 0.6000, ratio=0.4)" in text
    assert "compressed sites' MACs per example: 58.1M -> 45.7M" in text


def test_markdown_has_site_and_pass_tables() -> None:
    markdown = _report().to_markdown()
    assert markdown.startswith("# Compression report\n")
    assert "| blocks.0.mlp.fc1 | 768x192 | 88 | 0.575 | 148,224 | 85,248 | 29M | 16.6M | 0.123 | break-even rank 154 |" in markdown
    assert "| head | 10x192 | - | 1.000 | 1,930 | 1,930 | 1.92k | 1.92k | - | excluded: excluded by the user's pattern |" in markdown
    assert "| attn.out_proj | 192x192 | - | 1.000 | 37,056 | 37,056 | - | - | - | hidden: inside leaf module 'attn' |" in markdown
    assert "## Passes" in markdown and "| insert_teacher_student | 0.50 | 2 | 0 |" in markdown


def test_json_round_trip_and_save(tmp_path: Path) -> None:
    report = _report()
    json_path, markdown_path = report.save(tmp_path / "reports")
    data = json.loads(json_path.read_text())
    assert data["totals"]["kept_fraction"] == report.kept_fraction
    assert data["pass_log"][1] == {"name": "fold_blends", "seconds": 0.25, "added": [], "removed": ["teacher"]}
    assert CompressionReport.from_dict(data) == report
    assert json.loads(report.to_json()) == data  # the string form of what save writes
    assert markdown_path.read_text() == report.to_markdown()
    legacy = {k: v for k, v in data.items() if k != "pass_log"}  # written before the pass log existed
    assert CompressionReport.from_dict(legacy).pass_log == ()


def test_training_summary_states_a_pruning_length_only_when_one_was_given() -> None:
    history = [{"step": 1, "loss": 0.9}, {"step": 600, "loss": 0.3}]
    given = {"config": TrainingConfig(steps=600, blend_steps=0.1, prune_steps=0.5).to_dict(), "history": history}
    assert training_summary(given)[0].endswith(
        "over the first 60, distillation weight 1, students pruned to the budget over the first 300"
    )
    with_blend = TrainingConfig(steps=600, blend_steps=0.1).to_dict()
    older = {key: value for key, value in with_blend.items() if key != "prune_steps"}  # a report from before prune_steps
    for config in (with_blend, older):
        assert training_summary({"config": config, "history": history})[0].endswith("over the first 60, distillation weight 1")
