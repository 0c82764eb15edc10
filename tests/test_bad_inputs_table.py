"""Every bad input a user can give the core gets its own exception from tunecomp_fx.errors, with a
message that says what is wrong, where, and what to do. One row per bad input; the README's section
"When something is wrong" lists the same rows for users (checked below)."""

from __future__ import annotations

import os
import re
import unittest.mock
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tunecomp_fx
from tunecomp_fx import (
    BudgetError,
    CalibrationError,
    CaptureError,
    ConfigError,
    ExportError,
    InputError,
    PassError,
    SiteError,
    TrainingError,
    TunecompError,
)
from tunecomp_fx.export import to_onnx
from tunecomp_fx.export.artifacts import save_compact
from tests.models import MLP, NoLinear

README = Path(__file__).resolve().parents[1] / "README.md"


def x() -> torch.Tensor:
    return torch.randn(4, 64)


def compress(model: nn.Module | None = None, inputs: object = None, **options: object) -> object:
    return tunecomp_fx.compress(MLP() if model is None else model, (x(),) if inputs is None else inputs, **{"ratio": 0.4, **options})


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.sum() > 0:  # Python control flow on a tensor's value: neither capture path handles it
            h = self.fc(h)
        return h


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


class Narrow(nn.Module):
    """Every site is past break-even: a 64x1 and a 1x64 matrix cannot be factorized smaller."""

    def __init__(self) -> None:
        super().__init__()
        self.widen = nn.Linear(1, 64)
        self.narrow = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.narrow(torch.relu(self.widen(x)))


class Bottleneck(nn.Module):
    """One 4x64 site: rank 1 (68 weights and the bias) keeps 72 of its 260, no fewer."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention (a leaf of symbolic tracing: only torch.export sees its projections)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def without_torch_export(call: Callable[[], object]) -> object:
    """`call` with torch.export failing, as it does on models it cannot trace."""
    with unittest.mock.patch("torch.export.export", side_effect=RuntimeError("torch.export cannot trace this model")):
        return call()


def old_weight_norm() -> nn.Module:
    """An MLP with torch.nn.utils.weight_norm (deprecated: its hooks make the model impossible to deep-copy)."""
    model = MLP()
    nn.utils.weight_norm(model.fc1)
    return model


def nan_head_bias() -> MLP:
    """An MLP whose output bias holds a NaN (a broken checkpoint): output 3 of every example is NaN."""
    model = MLP()
    with torch.no_grad():
        model.head_bias[3] = float("nan")
    return model


def batches(count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(8, 64), torch.randint(0, 10, (8,))) for _ in range(count)]


def train(**options: object) -> object:
    """A two-step joint run of the MLP."""
    return compress(**{"data": batches(), "steps": 2, **options})


def train_unprepared(**options: object) -> object:
    """`train`, failing if it gets as far as prepare: what it rejects is rejected before any work."""
    def no_prepare(*args: object, **kwargs: object) -> None:
        raise AssertionError("prepare ran before the bad option was rejected")

    with unittest.mock.patch("tunecomp_fx.train.prepare", no_prepare):
        return train(**options)


def empty_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(5, 64), torch.randint(0, 10, (5,))), batch_size=8, drop_last=True)


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def resumed(checkpoints: Path, **changed: object) -> object:
    """Resume, with `changed` options, from the checkpoints of a run of the MLP with the default ones."""
    train(checkpoint_dir=checkpoints, checkpoint_every=1)
    return train(resume=checkpoints, **changed)


def not_a_checkpoint(tmp_path: Path, content: object) -> Path:
    """A file named like a checkpoint: empty (content None), or a torch file of `content`."""
    path = tmp_path / "other.pt"
    if content is None:
        path.write_text("")
    else:
        torch.save(content, path)
    return path


def prepared_at(alpha: float, **options: object) -> torch.fx.GraphModule:
    prepared = tunecomp_fx.prepare(MLP(), (x(),), ratio=0.4, **options)
    tunecomp_fx.set_blend(prepared, alpha)
    return prepared


def under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "model.onnx"


def unwritable_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "model.onnx"


class TwoHeads(nn.Module):
    """A trunk and two heads; the loss below reads the first output alone (as a pooler beside the hidden states)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.head, self.pooler = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.trunk(h))
        return self.head(h), self.pooler(h)


class TiedOnly(nn.Module):
    """One linear layer, its weight tied to an embedding with max_norm (which renormalizes the table in
    place, so no lookup of a student's factors can stand in for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(100, 32, max_norm=1.0), nn.Linear(32, 100, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def union_without_the_pooler() -> object:
    calib = [((x(),), torch.randint(0, 64, (4,)))]
    return compress(model=TwoHeads(), method="union", rank_slack=0.0, calib=calib, loss_fn=lambda outputs, t: F.cross_entropy(outputs[0], t))


@dataclass(frozen=True)
class Row:
    bad_input: str  # what the user did, as the README's table says it
    id: str
    call: Callable[[Path], object]
    error: type[TunecompError]
    says: tuple[str, ...]  # patterns the message must match: what is wrong, where, what to do
    root_skips: bool = False  # permission checks do not bind root


NAN_CALIB = [(x(),), (torch.full((4, 64), float("nan")),)]
INF_CALIB = [(x(),), (torch.full((4, 64), float("inf")),)]
NOT_SCALAR = ("it must return a scalar \\(0-dim\\) tensor", "reduction='mean'")
FRESH_RUN = "start a fresh run without resume="
RESUME_FROM = "give resume= a run's checkpoint_dir"
OUTSIDE = (r"outside \(0, 1\)", "fraction of the compressed layers' parameters to remove", r"ratio=0\.4 keeps 60%")

ROWS = [
    *(Row("ratio not in (0, 1)", f"ratio_{r}", lambda _, r=r: compress(ratio=r), ConfigError, (f"ratio={r}", *OUTSIDE))
      for r in (0.0, 1.0, -0.2, 1.5, float("nan"))),
    *(Row("ratio not a number", f"ratio_{r!r}", lambda _, r=r: compress(ratio=r), ConfigError, ("must be a number in \\(0, 1\\)", re.escape(repr(r))))
      for r in ("0.4", True)),
    Row("unknown option", "unknown_option", lambda _: compress(rnak_multiple=8), ConfigError,
        ("unexpected keyword argument 'rnak_multiple'", "tunecomp_fx.CompressionConfig")),
    Row("unknown choice of init or allocation", "unknown_init", lambda _: compress(init="pca"), ConfigError,
        ("init='pca' is not one of whitened, svd, asvd",)),
    Row("model is not a torch.nn.Module", "model_not_module", lambda _: compress(model=[nn.Linear(4, 4)]), InputError,
        ("must be a torch.nn.Module", "got list")),
    Row("model on the meta device", "meta_model", lambda _: compress(model=MLP().to("meta")), InputError,
        ("on the meta device", "'head_weight'|'fc1.weight'", "no values", r"to_empty\(device='cpu'\)", "load_state_dict")),
    Row("example inputs of the wrong shape", "inputs_wrong_shape", lambda _: compress(inputs=(torch.randn(4, 63),)), InputError,
        ("do not fit the model", r"#0: torch.float32 \[4, 63\]", "weights are torch.float32 on cpu", "shapes, dtypes and device")),
    *(Row("example inputs of the wrong dtype", f"inputs_{dtype}", lambda _, d=dtype: compress(inputs=(torch.ones(4, 64, dtype=d),)), InputError,
          ("do not fit the model", f"#0: {dtype} \\[4, 64\\]", "weights are torch.float32", "shapes, dtypes and device"))
      for dtype in (torch.float64, torch.int64)),
    Row("example inputs on the wrong device", "inputs_wrong_device", lambda _: compress(inputs=(x().to("meta"),)), InputError,
        ("example input #0 is on device 'meta'", "weights are on 'cpu'", r"\.to\('cpu'\)")),
    Row("no example inputs", "inputs_empty", lambda _: compress(inputs=()), InputError,
        ("do not fit the model", "no tensor inputs", "tuple of tensors in the order of forward")),
    Row("a model that cannot be copied (torch.nn.utils.weight_norm)", "uncopyable", lambda _: compress(model=old_weight_norm()), InputError,
        ("the model cannot be copied", "never modified", r"torch\.nn\.utils\.parametrizations\.weight_norm", "remove_weight_norm")),
    Row("a model that outputs NaN or inf on the example inputs", "nan_outputs", lambda _: compress(model=nan_head_bias()), InputError,
        ("output 0 on the example inputs holds NaN or inf", r"\(4 of 40 values\)", "must be finite", "NaN or inf loaded from a checkpoint")),
    Row("example inputs that are not tensors", "inputs_not_tensors", lambda _: compress(inputs="x"), InputError,
        ("example_inputs must be a tensor, a tuple of positional tensors or a dict of keyword tensors", "got str")),
    Row("no compressible linear site", "no_sites", lambda _: compress(model=NoLinear(), inputs=(torch.randn(4, 8),)), SiteError,
        ("NoLinear has no compressible linear site", "nothing to compress")),
    Row("every site excluded", "all_excluded", lambda _: compress(exclude=("fc*", "head*")), SiteError,
        ("all 3 linear sites are left dense", "'excluded': 3", "excluded: 'fc1', excluded by the user's pattern", "loosen `exclude`")),
    Row("every site's weight tied to another parameter", "all_tied", lambda _: compress(model=TiedOnly(), inputs=(torch.randint(0, 100, (4, 10)),)), SiteError,
        ("all 1 linear sites are left dense", "shared: 'head', weight tied with embed.weight", "give the layers weights of their own")),
    Row("every site hidden from the capture", "all_hidden",
        lambda _: without_torch_export(lambda: compress(model=SelfAttention(), inputs=(torch.randn(2, 10, 64),))), SiteError,
        ("all 1 linear sites are left dense", r"hidden: 'attn.out_proj', inside leaf module attn \(MultiheadAttention",
         "torch.export failed .*cannot trace this model", "make the layers visible to a capture")),
    Row("method='union' with a compressed site the loss does not reach", "union_unreached", lambda _: union_without_the_pooler(), CalibrationError,
        ("the loss does not depend on site 'pooler'", "on the loss's path", r"exclude=\('pooler',\)", "method='tunecomp'")),
    Row("NaN or inf in calibration data", "calib_nan", lambda _: compress(calib=NAN_CALIB), CalibrationError,
        ("calibration batch 1", "NaN or inf", "site 'fc1'", "clean the calibration data")),
    Row("NaN or inf in calibration data", "calib_inf", lambda _: compress(calib=INF_CALIB), CalibrationError,
        ("calibration batch 1", "NaN or inf", "site 'fc1'", "clean the calibration data")),
    Row("calibration batch that does not fit the model", "calib_wrong_shape", lambda _: compress(calib=[(x(),), (torch.randn(4, 63),)]),
        CalibrationError, ("calibration batch 1 does not fit the model", r"\[4, 63\]", "form of the example inputs")),
    Row("empty calibration data", "calib_empty", lambda _: compress(calib=[]), CalibrationError,
        ("calibration data is empty", "at least one batch")),
    Row("calibration data that is not an iterable of batches", "calib_not_iterable", lambda _: compress(calib=5), InputError,
        ("calib must be an iterable of input batches", "got int")),
    Row("budget that cannot be met: every site past break-even", "budget_break_even",
        lambda _: compress(model=Narrow(), inputs=(torch.randn(4, 1),)), BudgetError,
        ("ratio=0.4 cannot be met", "every compressed site is past break-even", r"widen \(64x1\), narrow \(1x64\)", "nothing to compress")),
    Row("budget that cannot be met: ratio beyond rank 1 everywhere", "budget_too_high",
        lambda _: compress(model=Bottleneck(), ratio=0.8), BudgetError,
        ("ratio=0.8 cannot be met", "rank 1 everywhere already keeps 72 of 260", r"largest reachable ratio is 0\.723", "smaller ratio")),
    Row("data-dependent control flow that neither capture path handles", "data_dependent",
        lambda _: compress(model=DataDependent(), inputs=(torch.randn(4, 8),)), CaptureError,
        ("could not capture DataDependent", "symbolic tracing failed", "torch.export failed",
         r"test_bad_inputs_table.py:\d+ in Gate.forward of module 'gate'", r"`if h.sum\(\) > 0:", "torch.where", "register_leaf_module")),
    Row("finalize of a model prepare did not make", "finalize_plain", lambda _: tunecomp_fx.finalize(MLP()), InputError,
        ("not made by tunecomp_fx.prepare", r"call prepare\(model, example_inputs\) first")),
    Row("finalize while the teacher is still blended in", "finalize_alpha", lambda _: tunecomp_fx.finalize(prepared_at(0.3)), PassError,
        ("pass 'fold_blends' cannot run", r"alpha = 0\.3", r"set_blend\(model, 0\.0\)")),
    Row("finalize while slack is left (the blend stopped early)", "finalize_slack",
        lambda _: tunecomp_fx.finalize(prepared_at(0.0, rank_slack=0.5)), PassError,
        ("pass 'eliminate_pruned_ranks' cannot run", r"would keep [\d,]+ parameters where the ratio allows [\d,]+",
         "train to the end of the blend", r"tunecomp_fx\.prune_slack\(model\)")),
    Row("blend weight outside [0, 1]", "set_blend_range", lambda _: tunecomp_fx.set_blend(prepared_at(1.0), 1.5), ConfigError,
        (r"alpha must be in \[0, 1\]", "got 1.5")),
    Row("report of a model compress did not make", "report_plain", lambda _: tunecomp_fx.get_report(MLP()), InputError,
        ("has no tunecomp report", "not made by tunecomp_fx.finalize or compress")),
    Row("ONNX output folder that is not writable", "onnx_folder_is_a_file",
        lambda tmp: to_onnx(MLP(), (x(),), under_a_file(tmp)), ExportError,
        ("cannot write the ONNX file", "file is a file, not a folder", "not writable", "Choose an output folder you can write to")),
    Row("ONNX output folder that is not writable", "onnx_folder_read_only",
        lambda tmp: to_onnx(MLP(), (x(),), unwritable_folder(tmp)), ExportError,
        ("cannot write the ONNX file", "read_only is not writable", "PermissionError", "Choose an output folder"), root_skips=True),
    Row("save_compact output folder that is not writable", "save_compact_folder_is_a_file",
        lambda tmp: save_compact(compress(), under_a_file(tmp).parent, (x(),)), ExportError,
        ("cannot write the compact model to .*file", "file is a file, not a folder", "Choose an output folder you can write to")),
    Row("empty training data", "data_empty", lambda _: train(data=empty_loader()), InputError,
        (r"the training data \(data=\) yielded no batches", "at least one batch", "drop_last=True")),
    Row("training data that is used up after one pass", "data_one_pass", lambda _: train(data=iter(batches()), steps=3), InputError,
        ("yielded no batches in pass 2", "a generator or iterator is used up after one pass", "can be iterated again")),
    Row("loss that returns a non-scalar", "loss_per_sample", lambda _: train(loss_fn=per_sample_loss), TrainingError,
        (r"loss_fn returned a tensor of shape \[8\] at step 1 of 2", *NOT_SCALAR)),
    Row("loss that returns a non-scalar", "loss_not_tensor", lambda _: train(loss_fn=lambda outputs, targets: 1.0), TrainingError,
        ("loss_fn returned a float at step 1 of 2", *NOT_SCALAR)),
    Row("loss that returns a non-scalar", "loss_per_sample_union_calibration", lambda _: train(loss_fn=per_sample_loss, method="union"),
        TrainingError, (r"loss_fn returned a tensor of shape \[8\] on calibration batch 0", "method='union'", *NOT_SCALAR)),
    Row("checkpoint from another training config", "resume_other_config", lambda tmp: resumed(tmp, lr=1e-3), TrainingError,
        (r"step_0000002\.pt was written with a different training config", r"'lr': \(0\.0001, 0\.001\)",
         "Resume with the training options it was written with", FRESH_RUN)),
    Row("checkpoint from another model or compression", "resume_other_model", lambda tmp: resumed(tmp, model=MLP(hidden=80)),
        TrainingError, (r"step_0000002\.pt was written for a different model or compression",
                        r"parameters \(fc1\.bias: \[96\] -> \[80\], fc1\.weight: \[96, 64\] -> \[80, 64\]",
                        "Prepare the same model with the same options", FRESH_RUN)),
    Row("checkpoint from another model or compression", "resume_other_ratio", lambda tmp: resumed(tmp, ratio=0.5), TrainingError,
        ("written for a different model or compression", r"compression_config \(ratio: 0\.4 -> 0\.5\)", r"ranks \(fc1: \d+ -> \d+",
         "Prepare the same model with the same options", FRESH_RUN)),
    Row("resume from a file that is not a checkpoint", "resume_unreadable", lambda tmp: train(resume=not_a_checkpoint(tmp, None)),
        TrainingError, (r"cannot read checkpoint .*other\.pt \(EOFError\)", RESUME_FROM)),
    Row("resume from a file that is not a checkpoint", "resume_other_file", lambda tmp: train(resume=not_a_checkpoint(tmp, {"a": 1})),
        TrainingError, (r"other\.pt is not a tunecomp checkpoint", RESUME_FROM)),
    Row("resume from a checkpoint that does not exist", "resume_missing", lambda tmp: train(resume=tmp / "step_0000002.pt"),
        TrainingError, (r"checkpoint .*step_0000002\.pt does not exist", RESUME_FROM)),
    Row("resume from a folder without checkpoints", "resume_empty_folder", lambda tmp: train(resume=tmp), TrainingError,
        (r"no checkpoint \(step_\*\.pt\) in", "the run wrote none there", "Give resume= the checkpoint_dir of the run")),
    Row("checkpoint folder that is not writable", "checkpoint_dir_is_a_file",
        lambda tmp: train_unprepared(checkpoint_dir=under_a_file(tmp).parent, checkpoint_every=1), TrainingError,
        ("cannot write checkpoints to checkpoint_dir=", "file is a file, not a folder", "Choose an output folder you can write to")),
    Row("checkpoint folder that is not writable", "checkpoint_dir_read_only",
        lambda tmp: train_unprepared(checkpoint_dir=unwritable_folder(tmp).parent, checkpoint_every=1), TrainingError,
        ("cannot write checkpoints to checkpoint_dir=", "read_only is not writable", "PermissionError", "Choose an output folder"),
        root_skips=True),
    Row("ONNX output path that is a folder", "onnx_path_is_folder", lambda tmp: to_onnx(MLP(), (x(),), tmp), ExportError,
        ("is a folder", "model.onnx")),
]


def _param(row: Row) -> object:
    skip = pytest.mark.skipif(row.root_skips and os.geteuid() == 0, reason="root writes to read-only folders")
    return pytest.param(row, id=row.id, marks=skip)


@pytest.mark.parametrize("row", [_param(row) for row in ROWS])
def test_bad_input_gets_its_error_and_a_message_that_says_what_to_do(row: Row, tmp_path: Path):
    torch.manual_seed(0)
    with pytest.raises(TunecompError) as raised:
        row.call(tmp_path)
    assert type(raised.value) is row.error, f"{type(raised.value).__name__}: {raised.value}"
    message = str(raised.value)
    missing = [pattern for pattern in row.says if not re.search(pattern, message)]
    assert not missing, f"{missing} not in: {message}"


def test_readme_lists_every_bad_input_with_its_error():
    section = README.read_text().split("## When something is wrong", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    for row in ROWS:
        assert any(row.bad_input in line and f"`{row.error.__name__}`" in line for line in lines), row.bad_input
