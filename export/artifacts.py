"""Save a compact model as files that load anywhere torch and safetensors do, with no import of
tunecomp_fx, and load them back.

A saved folder holds:
    program.pt2         the compact graph as a torch.export archive, weights stripped (meta tensors)
    model.safetensors   the weights, keyed by the program's state_dict names
    inputs.safetensors  the example inputs (metadata: positional or keyword, and their order)
    config.json         the CompressionConfig
    report.json, report.md  the report (and the joint run's config and per-step history, when trained)

Loading it without this package (what `load_compact` does, less the report):

    import torch
    from safetensors.torch import load_file
    model = torch.export.load("out/program.pt2").module()
    model.load_state_dict(load_file("out/model.safetensors"), assign=True)
    outputs = model(torch.randn(1, 3, 224, 224))

The program is exported in inference mode with every dimension that can vary left dynamic (the
batch at least); the loaded module runs as is: torch.export modules do not support .train()/.eval().
torch.export rather than a pickled GraphModule because a pickle names the classes it was built from
(the tracer, timm's leaf modules), while an export archive holds only torch operators.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import fx

from tunecomp_fx.api import CONFIG_KEY, REPORT_KEY, get_report
from tunecomp_fx.errors import ExportError, InputError
from tunecomp_fx.folders import check_writable_folder
from tunecomp_fx.modes import eval_mode
from tunecomp_fx.inputs import Inputs, call_model, flatten_outputs, normalize_inputs
from tunecomp_fx.train import TRAINING_KEY

PROGRAM_FILE = "program.pt2"
WEIGHTS_FILE = "model.safetensors"
INPUTS_FILE = "inputs.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class SavedCompact:
    folder: Path
    files: tuple[Path, ...]
    max_abs_error: float  # reloaded program against the in-memory compact model, on the example inputs


def _batch_of_two(inputs: Inputs) -> Inputs:
    """Export specializes a size-1 dimension to 1; tracing at batch 2 keeps the batch dynamic."""

    def widen(value: object) -> object:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1:
            return value.expand(2, *value.shape[1:]).contiguous()
        return value

    if isinstance(inputs, Mapping):
        return {k: widen(v) for k, v in inputs.items()}
    return tuple(widen(v) for v in inputs)


def _every_dim_auto(inputs: Inputs) -> object:
    def dims(value: object) -> object:
        return {i: torch.export.Dim.AUTO for i in range(value.dim())} if isinstance(value, torch.Tensor) else None

    if isinstance(inputs, Mapping):
        return {k: dims(v) for k, v in inputs.items()}
    return tuple(dims(v) for v in inputs)


def _plain(value: object) -> object:
    """Outputs as builtin containers: an export archive records the output structure by type name,
    so a library's class (a Hugging Face ModelOutput) would make loading need that library."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):  # a namedtuple too
        return tuple(_plain(item) for item in value)
    return value


class _PlainOutputs(torch.nn.Module):
    """Runs `model` and returns its outputs as builtin containers. It shares the model's submodules,
    parameters and buffers (not a child module), so the exported names stay the model's own."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._modules, self._parameters, self._buffers = model._modules, model._parameters, model._buffers

        def forward(*args: object, **kwargs: object) -> object:
            return _plain(model(*args, **kwargs))

        # The model's own signature, so that the program's inputs keep their names (x, input_ids, ...).
        forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
        self.forward = forward


def export_program(model: torch.nn.Module, example_inputs: Inputs) -> torch.export.ExportedProgram:
    """torch.export the model in inference mode, with every dimension that can vary left dynamic."""
    inputs = _batch_of_two(normalize_inputs(example_inputs))
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else (tuple(inputs), {})
    try:
        with eval_mode(model):
            return torch.export.export(_PlainOutputs(model), args, kwargs, dynamic_shapes=_every_dim_auto(inputs), strict=False)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExportError(f"torch.export could not export the compact model ({type(error).__name__}: {first})") from error


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): store a copy of each repeat."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return result


def _save_inputs(inputs: Inputs, path: Path) -> None:
    kind = "keyword" if isinstance(inputs, Mapping) else "positional"
    named = dict(inputs) if kind == "keyword" else {f"arg{i}": v for i, v in enumerate(inputs)}
    non_tensors = [name for name, value in named.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise InputError(f"example inputs {non_tensors} are not tensors; only tensor inputs can be saved")
    save_file(_unshared(named), str(path), metadata={"kind": kind, "order": json.dumps(list(named))})


def load_inputs(folder: str | Path) -> Inputs:
    """The example inputs saved beside a compact model: a tuple, or a dict of keyword tensors."""
    path = Path(folder) / INPUTS_FILE
    if not path.is_file():
        raise InputError(f"{path} does not exist; it is written by save_compact")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in json.loads(metadata["order"])}
    return tensors if metadata["kind"] == "keyword" else tuple(tensors.values())


def _max_abs_error(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    if len(expected) != len(actual) or any(e.shape != a.shape for e, a in zip(expected, actual)):
        raise ExportError(
            f"the reloaded program returns shapes {[tuple(a.shape) for a in actual]}, "
            f"the compact model {[tuple(e.shape) for e in expected]}"
        )
    return max(((e.double() - a.double()).abs().max().item() for e, a in zip(expected, actual) if e.numel()), default=0.0)


def save_compact(compact: fx.GraphModule, folder: str | Path, example_inputs: object) -> SavedCompact:
    """Write the compact model (program + weights), its example inputs, config and report into
    `folder`, then load the files back and check they reproduce the model on the example inputs."""
    report = get_report(compact)
    inputs = normalize_inputs(example_inputs)
    folder = Path(folder)
    check_writable_folder(folder, f"the compact model to {folder}", ExportError)
    program = export_program(compact, inputs)
    weights = _unshared(program.state_dict)
    for name, tensor in program.state_dict.items():
        empty = torch.empty_like(tensor, device="meta")
        program.state_dict[name] = torch.nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else empty
    torch.export.save(program, folder / PROGRAM_FILE)
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"program": PROGRAM_FILE})
    _save_inputs(inputs, folder / INPUTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(compact.meta.get(CONFIG_KEY, {}), indent=2) + "\n")
    report_files = report.save(folder, training=compact.meta.get(TRAINING_KEY))

    with torch.no_grad():
        expected = flatten_outputs(call_model(compact, inputs))
        actual = flatten_outputs(call_model(load_compact(folder), inputs))
    error = _max_abs_error(expected, actual)
    scale = max((e.abs().max().item() for e in expected if e.numel()), default=0.0)
    if not error <= 1e-4 * max(1.0, scale):
        raise ExportError(f"the saved program differs from the compact model by {error:.3g} (output scale {scale:.3g})")
    files = (folder / PROGRAM_FILE, folder / WEIGHTS_FILE, folder / INPUTS_FILE, folder / CONFIG_FILE, *report_files)
    return SavedCompact(folder, files, error)


def load_compact(folder: str | Path) -> fx.GraphModule:
    """Load a folder written by save_compact. Needs only torch and safetensors (see the module
    docstring for the same in five lines); the report and config go back into `meta` when present."""
    folder = Path(folder)
    missing = [name for name in (PROGRAM_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder} is not a saved compact model: {', '.join(missing)} missing (write it with save_compact)")
    model = torch.export.load(folder / PROGRAM_FILE).module()
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), assign=True)
    for key, file in ((REPORT_KEY, "report.json"), (CONFIG_KEY, CONFIG_FILE)):
        if (folder / file).is_file():
            model.meta[key] = json.loads((folder / file).read_text())
    if "training" in model.meta.get(REPORT_KEY, {}):
        model.meta[TRAINING_KEY] = model.meta[REPORT_KEY].pop("training")
    return model
