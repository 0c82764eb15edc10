"""Export a model to one ONNX file with dynamic batch (and sequence) axes, verified in ONNX Runtime.

Exporter choice (measured on torch 2.14.1): the torch.export-based exporter (`dynamo=True`) handles
`symbolic_trace` GraphModules, `torch.export(...).module()` GraphModules, timm ViTs and HF BERT alike,
and emits a graph with BatchNorm already folded. The legacy TorchScript exporter fails on the first
two out of the box and on timm's fx-traced ViT, but it does trace data-dependent Python control flow
(one branch baked in) where torch.export refuses; so it is the fallback, never the first choice.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from tunecomp_fx.errors import ConfigError, ExportError, InputError
from tunecomp_fx.folders import check_writable_folder
from tunecomp_fx.modes import eval_mode
from tunecomp_fx.progress import progress_bar

from ._ort import cpu_session, to_numpy
from .translations import TRANSLATIONS

ExampleInputs = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
DynamicAxes = dict[str, dict[int, str]]
Translations = Mapping[Callable[..., Any], Callable[..., Any]]

BATCH_AXIS = "batch"


@dataclass(frozen=True)
class ExportResult:
    """What `to_onnx` wrote and how well ONNX Runtime agreed with PyTorch.

    `max_errors` maps a description of the input shapes (e.g. "x=3x16") to the largest absolute
    difference over all outputs at those shapes; it is empty when verification was skipped.
    `external_data` names side files holding weights: empty unless the model is over ONNX's 2 GB limit.
    """

    path: Path
    exporter: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: DynamicAxes
    max_errors: dict[str, float]
    external_data: tuple[str, ...]


def to_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | PathLike[str],
    *,
    dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    opset: int | None = None,
    translations: Translations | None = None,
    check_inputs: Sequence[ExampleInputs] | None = None,
    progress: bool = False,
) -> ExportResult:
    """Write `model` to `path` as ONNX and (by default) check ONNX Runtime against PyTorch at two shapes.

    Dim 0 of every input is a dynamic batch axis (`<name>_0` for an input whose length differs from
    the first input's, as offsets beside ids); `dynamic_dims` names more per input, e.g.
    `{"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}`. Positional inputs are named
    after the parameters of `model.forward`. The model runs in eval mode throughout; its mode is
    restored afterwards. A file that fails the check is moved to `<name>.unverified.onnx` and the
    ExportError says why. `translations` maps ops ONNX lacks (custom ops, e.g.
    `torch.ops.mylib.op.default`) to onnxscript functions, as torch.onnx.export's
    `custom_translation_table` does; they join tunecomp's own (`TRANSLATIONS`) and win over them.
    The check runs at `example_inputs` and then at each dynamic axis resized by one, or at
    `check_inputs` (inputs given as `example_inputs` are) where sizes are tied: an EmbeddingBag's
    offsets index into its ids, so that resizing either alone makes inputs PyTorch does not define.
    `progress` shows a bar over the stages (export, each verified shape).
    """
    keyword = isinstance(example_inputs, Mapping)
    names, tensors = _named_inputs(model, example_inputs)
    axes = _dynamic_axes(names, tensors, dynamic_dims)
    variants = _check_variants(model, names, tensors, axes, check_inputs)
    if translations is not None and not isinstance(translations, Mapping):
        raise ConfigError(f"translations must map ops to onnxscript functions (a dict); got {type(translations).__name__}")
    path = Path(path)
    _check_writable(path)
    flat_model = _FlatOutputs(model, names, keyword)
    with eval_mode(model), torch.no_grad():
        try:
            flat_model.output_names = [name for name, _ in flat_model.named_outputs(*tensors)]
        except Exception as error:
            raise InputError(f"the model fails on example_inputs: {_first_line(error)}") from error
        if not flat_model.output_names:
            raise InputError("the model returns no tensor on example_inputs, so there is nothing to export")
        stages = 1 + (len(variants) if verify else 0)
        with progress_bar(total=stages, desc="ONNX export", leave=False, enabled=progress) as bar:
            exporter = _export(flat_model, tensors, path, axes, opset, {**TRANSLATIONS, **(translations or {})})
            bar.update()
            max_errors = _verified(flat_model, path, names, variants, check_inputs is None, atol, rtol, bar) if verify else {}

    proto = onnx.load(str(path), load_external_data=False)
    return ExportResult(
        path=path,
        exporter=exporter,
        input_names=tuple(value.name for value in proto.graph.input),
        output_names=tuple(value.name for value in proto.graph.output),
        dynamic_axes=_symbolic_axes(proto),
        max_errors=max_errors,
        external_data=_external_data_files(proto),
    )


def _check_writable(path: Path) -> None:
    """Fail before the (slow) export when the file cannot be written; create missing folders."""
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give to_onnx a file path such as {path / 'model.onnx'}")
    check_writable_folder(path.parent, f"the ONNX file {path}", ExportError)


class _FlatOutputs(nn.Module):
    """Calls the model with positional tensors and returns its outputs as one flat tuple of tensors.

    Exporting this wrapper instead of the model gives both exporters the same plain signature, and
    makes the ONNX outputs line up one to one with the tensors verification compares against.
    """

    def __init__(self, model: nn.Module, input_names: list[str], keyword: bool) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.keyword = keyword
        self.output_names: list[str] = []
        self.training = False

    def train(self, mode: bool = True) -> _FlatOutputs:
        # `eval_mode` owns the wrapped model's mode; exporters that toggle it would reach torch.export
        # GraphModules, which raise on `.train()`.
        return self

    def named_outputs(self, *tensors: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        outputs = self.model(**dict(zip(self.input_names, tensors))) if self.keyword else self.model(*tensors)
        return _flatten_outputs(outputs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tensor for _, tensor in self.named_outputs(*tensors))


def _flatten_outputs(outputs: object, prefix: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a tensor, tuple/list, dict or HF ModelOutput (a dict), nested.

    Dict outputs keep their keys as names ("logits"); positions become "output_0", "output_1", ...
    """
    if isinstance(outputs, torch.Tensor):
        return [(prefix or "output", outputs)]
    if isinstance(outputs, Mapping):
        children = [(str(key) if prefix is None else f"{prefix}_{key}", value) for key, value in outputs.items()]
    elif isinstance(outputs, (tuple, list)):
        children = [(f"{prefix or 'output'}_{index}", value) for index, value in enumerate(outputs)]
    else:
        return []  # None and Python scalars have no ONNX counterpart
    return [pair for name, value in children for pair in _flatten_outputs(value, name)]


def _named_inputs(model: nn.Module, example_inputs: ExampleInputs) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(example_inputs, Mapping):
        names, tensors = [str(name) for name in example_inputs], list(example_inputs.values())
    elif isinstance(example_inputs, Sequence):
        tensors = list(example_inputs)
        names = _positional_names(model, len(tensors))
    else:
        raise InputError(
            "example_inputs must be a tuple of tensors or a dict of keyword tensors, "
            f"got {type(example_inputs).__name__}"
        )
    if not tensors or not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
        raise InputError(
            "example_inputs must hold at least one tensor and only tensors; "
            "fix other arguments inside the model (e.g. with functools.partial) before export"
        )
    return names, tensors


def _positional_names(model: nn.Module, count: int) -> list[str]:
    """The names of `model.forward`'s first `count` parameters, else input_0, input_1, ..."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    positional = [
        parameter.name
        for parameter in parameters
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    return positional[:count] if len(positional) >= count else [f"input_{index}" for index in range(count)]


def _dynamic_axes(
    names: list[str], tensors: list[torch.Tensor], dynamic_dims: Mapping[str, Mapping[int, str]] | None
) -> DynamicAxes:
    """Dim 0 of every input of the first input's length is the batch axis; an input of another length
    (an EmbeddingBag's offsets beside its ids) gets its own, `<name>_0`, since one name tells ONNX
    Runtime the sizes are equal. `dynamic_dims` adds (or renames) axes per input."""
    batched = [(name, tensor) for name, tensor in zip(names, tensors) if tensor.dim() > 0]
    batch = batched[0][1].shape[0] if batched else None
    axes: DynamicAxes = {name: {0: BATCH_AXIS if tensor.shape[0] == batch else f"{name}_0"} for name, tensor in batched}
    ranks = dict(zip(names, (tensor.dim() for tensor in tensors)))
    for name, dims in (dynamic_dims or {}).items():
        if name not in ranks:
            raise ConfigError(f"dynamic_dims names input {name!r}, but the inputs are {names}")
        for axis, axis_name in dims.items():
            if not -ranks[name] <= axis < ranks[name]:
                raise ConfigError(
                    f"dynamic_dims[{name!r}] has axis {axis}, but that input has {ranks[name]} dims"
                )
            axes.setdefault(name, {})[axis % ranks[name]] = str(axis_name)
    return axes


def _export(
    flat_model: _FlatOutputs, tensors: list[torch.Tensor], path: Path, axes: DynamicAxes, opset: int | None, translations: Translations
) -> str:
    """Try the exporters in order of preference; return the name of the one that worked."""
    exporters: tuple[tuple[str, Callable[[], None]], ...] = (
        ("dynamo", lambda: _export_dynamo(flat_model, tensors, path, axes, opset, translations)),
        ("torchscript", lambda: _export_torchscript(flat_model, tensors, path, axes, opset)),
    )
    failures: list[str] = []
    for exporter_name, export in exporters:
        try:
            export()
        except Exception as error:
            failures.append(f"{exporter_name}: {_first_line(error)}")
            continue
        if failures:
            warnings.warn(
                f"exported with the {exporter_name} exporter because {'; '.join(failures)}", stacklevel=3
            )
        return exporter_name
    raise ExportError("ONNX export failed with every exporter tried: " + "; ".join(failures) + ". " + _export_advice(failures[0]))


def _export_advice(dynamo_failure: str) -> str:
    """What to do about a failed export: give the op torch.export's exporter has no ONNX function for a
    translation, or replace what stops the export."""
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", dynamo_failure)
    if missing is not None:
        op = f"torch.ops.{missing[1]}.{missing[2]}"
        return (
            f"{op} has no ONNX translation: pass one, to_onnx(..., translations={{{op}: function}}) with an "
            "onnxscript function computing it from ONNX ops, or replace the op in the model"
        )
    return (
        "Replace the op named there with ones ONNX supports, and keep data-dependent Python "
        "control flow out of the model so that torch.export can capture it."
    )


def _export_dynamo(
    flat_model: _FlatOutputs, tensors: list[torch.Tensor], path: Path, axes: DynamicAxes, opset: int | None, translations: Translations
) -> None:
    # String axis names become Dim.DYNAMIC (ranges inferred, e.g. sequence <= 512 for BERT) and are
    # written to the ONNX file under these names.
    dynamic_shapes = {"tensors": tuple(axes.get(name) for name in flat_model.input_names)}
    with warnings.catch_warnings():
        # Inputs sharing an axis name trigger one of these per name; it is what we asked for.
        warnings.filterwarnings("ignore", message="# The axis name: .* will not be used")
        torch.onnx.export(
            flat_model,
            tuple(tensors),
            str(path),
            dynamo=True,
            verbose=False,
            input_names=flat_model.input_names,
            output_names=flat_model.output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            custom_translation_table=dict(translations),
            # One self-contained file; the exporter still splits weights out past the 2 GB protobuf limit.
            external_data=False,
        )


def _export_torchscript(
    flat_model: _FlatOutputs, tensors: list[torch.Tensor], path: Path, axes: DynamicAxes, opset: int | None
) -> None:
    with warnings.catch_warnings(), _native_stdout_discarded():
        # The exporter and its helpers announce their own deprecation; choosing it as fallback is deliberate.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            flat_model,
            tuple(tensors),
            str(path),
            dynamo=False,
            input_names=flat_model.input_names,
            output_names=flat_model.output_names,
            dynamic_axes=axes,
            opset_version=opset,
        )


@contextlib.contextmanager
def _native_stdout_discarded() -> Iterator[None]:
    """Discard what native code writes to the process's stdout meanwhile. torch 2.14's TorchScript
    exporter turns its C++ log on whatever `verbose` says (setup_onnx_logging tests the function
    _jit_is_onnx_log_enabled, not its result) and, when it fails, prints its whole IR graph there;
    the failure itself reaches the ExportError."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to keep clean
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _verified(
    flat_model: _FlatOutputs, path: Path, names: list[str], variants: list[list[torch.Tensor]], resized: bool,
    atol: float, rtol: float, bar: tqdm,
) -> dict[str, float]:
    """`_verify`; a file that fails it is moved aside (`<name>.unverified.onnx`), so that nothing
    unverified is left at `path` to be deployed, and the error says where it went."""
    try:
        return _verify(flat_model, path, names, variants, resized, atol, rtol, bar)
    except ExportError as error:
        kept = path.with_name(f"{path.stem}.unverified{path.suffix}")
        path.replace(kept)
        raise ExportError(f"{error} The unverified export is kept at {kept} for inspection; nothing is left at {path}.") from error.__cause__


def _verify(
    flat_model: _FlatOutputs,
    path: Path,
    names: list[str],
    variants: list[list[torch.Tensor]],
    resized: bool,
    atol: float,
    rtol: float,
    bar: tqdm,
) -> dict[str, float]:
    """Max abs error of ONNX Runtime against PyTorch at each variant of the inputs (the example's
    first; the others `resized` from it, or the user's check_inputs); `bar` advances once per variant."""
    try:
        session = cpu_session(path)
    except Exception as error:
        raise ExportError(
            f"ONNX Runtime cannot load the export: {_first_line(error)}. Its CPU provider lacks a kernel the "
            "model's ops need in their dtype (often arithmetic in bfloat16 or float16: compute that part "
            "in float32), or pass verify=False to keep the file without the check."
        ) from error
    onnx_names = [value.name for value in session.get_inputs()]
    max_errors: dict[str, float] = {}
    for index, variant in enumerate(variants):
        shapes = ", ".join(f"{name}={'x'.join(map(str, tensor.shape))}" for name, tensor in zip(names, variant))
        bar.set_description(f"ONNX Runtime check at {shapes}")
        tied = _TIED_SIZES_ADVICE if resized and index > 0 else ""
        try:
            expected = flat_model(*variant)
        except Exception as error:
            raise ExportError(f"the model fails in PyTorch at the check's input shapes {shapes}: {_first_line(error)}.{tied}") from error
        feed = {name: to_numpy(tensor) for name, tensor in zip(names, variant) if name in onnx_names}
        try:
            actual = session.run(None, feed)
        except Exception as error:
            raise ExportError(
                f"ONNX Runtime fails at input shapes {shapes}: {_first_line(error)}. "
                "A dynamic axis was probably baked in as a constant; "
                f"check the model for shape-dependent Python code.{tied}"
            ) from error
        max_errors[shapes] = max(
            _max_error(output_name, got, want, shapes, atol, rtol, tied)
            for output_name, got, want in zip(flat_model.output_names, actual, expected, strict=True)
        )
        bar.update()
    return max_errors


_TIED_SIZES_ADVICE = (
    " The check resized each dynamic axis by one from the example's inputs; where inputs' sizes are tied "
    "(offsets that index into ids), that makes inputs the model does not define: pass check_inputs=[...] "
    "with valid inputs of other sizes."
)


def _check_variants(
    model: nn.Module, names: list[str], tensors: list[torch.Tensor], axes: DynamicAxes, check_inputs: Sequence[ExampleInputs] | None
) -> list[list[torch.Tensor]]:
    """The inputs the check runs at: the example's, then each dynamic axis resized by one or the
    user's `check_inputs`, which must name the same inputs and differ only along dynamic axes."""
    if check_inputs is None:
        return [tensors] + [_resized(names, tensors, axes, axis_name) for axis_name in _axis_names(axes)]
    if (
        isinstance(check_inputs, Mapping) or not isinstance(check_inputs, Sequence) or not check_inputs
        or not all(isinstance(inputs, (Mapping, Sequence)) for inputs in check_inputs)
    ):
        raise InputError(
            "check_inputs must be a non-empty list of inputs, each given as example_inputs is (a tuple of tensors "
            "or a dict of keyword tensors; one set of inputs goes in a list too)"
        )
    variants = [tensors]
    for index, inputs in enumerate(check_inputs):
        these_names, these = _named_inputs(model, inputs)
        if these_names != names:
            raise InputError(f"check_inputs[{index}] has inputs {these_names}; example_inputs has {names}")
        for name, example, tensor in zip(names, tensors, these):
            dynamic = axes.get(name, {})
            fixed = [axis for axis in range(example.dim()) if axis not in dynamic]
            if tensor.dim() != example.dim() or any(tensor.shape[axis] != example.shape[axis] for axis in fixed):
                raise InputError(
                    f"check_inputs[{index}][{name!r}] has shape {tuple(tensor.shape)} where example_inputs has "
                    f"{tuple(example.shape)}, and only dims {sorted(dynamic)} of it are dynamic: name the others "
                    "in dynamic_dims, or keep their size"
                )
        variants.append(these)
    return variants


def _axis_names(axes: DynamicAxes) -> list[str]:
    return list(dict.fromkeys(axis_name for dims in axes.values() for axis_name in dims.values()))


def _resized(
    names: list[str], tensors: list[torch.Tensor], axes: DynamicAxes, axis_name: str
) -> list[torch.Tensor]:
    """The inputs with every axis called `axis_name` resized by one, reusing existing slices so that
    token ids and masks stay valid: the batch grows; other axes shrink (staying within limits such as
    a maximum sequence length) unless they are too short to."""
    resized = []
    for name, tensor in zip(names, tensors):
        for axis, this_name in axes.get(name, {}).items():
            if this_name == axis_name:
                size = tensor.shape[axis]
                if axis_name == BATCH_AXIS or size <= 2:
                    tensor = torch.cat([tensor, tensor.narrow(axis, 0, 1)], dim=axis)
                else:
                    tensor = tensor.narrow(axis, 0, size - 1)
        resized.append(tensor)
    return resized


def _max_error(
    output_name: str, actual: np.ndarray, expected: torch.Tensor, shapes: str, atol: float, rtol: float, advice: str = ""
) -> float:
    want = expected.detach().cpu().to(torch.float64).numpy()
    got = np.asarray(actual, dtype=np.float64)
    if got.shape != want.shape:
        raise ExportError(
            f"output {output_name!r} has shape {got.shape} in ONNX Runtime but {want.shape} in PyTorch "
            f"at input shapes {shapes}; a dynamic axis was probably exported as a constant.{advice}"
        )
    error = np.abs(got - want)
    error[np.isnan(got) & np.isnan(want)] = 0.0
    max_error = float(error.max()) if error.size else 0.0
    if not np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True).all():
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch on output {output_name!r} at input shapes {shapes}: "
            f"max abs error {max_error:.3g} exceeds atol + rtol*|ref| (atol={atol:g}, rtol={rtol:g}). "
            "Look for an op whose ONNX translation differs (re-export with verify=False and compare "
            "layer outputs), a model captured in training mode (dropout), or loosen atol/rtol if the "
            f"gap is expected, e.g. from reduced precision.{advice}"
        )
    return max_error


def _symbolic_axes(proto: onnx.ModelProto) -> DynamicAxes:
    axes: DynamicAxes = {}
    for value in proto.graph.input:
        shape = value.type.tensor_type.shape.dim
        dims = {index: dim.dim_param for index, dim in enumerate(shape) if dim.dim_param}
        if dims:
            axes[value.name] = dims
    return axes


def _external_data_files(proto: onnx.ModelProto) -> tuple[str, ...]:
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return tuple(sorted(locations))


def _first_line(error: BaseException) -> str:
    """`Type: first line` of the root cause, without terminal colour codes (the dynamo exporter adds some)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
