"""Model capture: symbolic tracing with a registry of leaf modules and wrapped functions, falling
back to torch.export with dynamic batch (and sequence) dimensions when tracing fails or hides
compressible layers inside leaves. The result says which path was used and why."""

from __future__ import annotations

import copy
import linecache
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from tunecomp_fx.errors import CaptureError, InputError, first_line
from tunecomp_fx.forms import compressible_module, match_sites
from tunecomp_fx.inputs import Inputs, call_model, describe_inputs, flatten_outputs, named_tensors
from tunecomp_fx.sites import Site

BATCH, SEQUENCE = "batch", "sequence"
DynamicDims = dict[str | int, dict[int, str]]  # input name (keyword) or position -> {dim: axis name}
# GraphModule.meta key: the compressible layers of the captured model, {module path: layout}. A graph
# keeps the module types only of the modules it calls, so they are recorded before capture.
LAYERS_KEY = "tunecomp_layers"

# Module types not to trace into, each with its reason (after timm's _features_fx registry).
# Their own linear layers stay inside the leaf and are not compressible sites.
LEAF_MODULES: dict[type[nn.Module], str] = {}
# Functions kept as single call_function nodes instead of being traced through, with reasons.
WRAPPED_FUNCTIONS: dict[Callable, str] = {}


def register_leaf_module(module_type: type[nn.Module], reason: str) -> None:
    LEAF_MODULES[module_type] = reason


def register_wrapped_function(function: Callable, reason: str) -> None:
    WRAPPED_FUNCTIONS[function] = reason


def _timm_registry() -> tuple[set[type[nn.Module]], set[Callable]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return set(), set()
    return set(timm_fx.get_notrace_modules()), set(timm_fx.get_notrace_functions())


@dataclass
class Capture:
    graph_module: fx.GraphModule
    path: str  # "symbolic_trace" or "torch.export"
    reason: str


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type[nn.Module], ...], functions: tuple[Callable, ...]) -> None:
        super().__init__(autowrap_functions=functions)
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)


def symbolic_capture(model: nn.Module, inputs: Inputs) -> fx.GraphModule:
    timm_leaves, timm_functions = _timm_registry()
    leaves = tuple(set(LEAF_MODULES) | timm_leaves)
    functions = tuple(set(WRAPPED_FUNCTIONS) | timm_functions)
    tracer = _LeafTracer(leaves, functions)
    concrete_args = None
    if isinstance(inputs, Mapping):
        # Keyword models (Hugging Face) have many optional arguments: those not given are constants.
        import inspect

        params = inspect.signature(model.forward).parameters
        concrete_args = {name: p.default for name, p in params.items() if name not in inputs and p.default is not inspect.Parameter.empty}
    graph = tracer.trace(model, concrete_args=concrete_args)
    graph._tracer_cls = None  # so that pickles of the result never reference this module
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def dynamic_dims_of(inputs: Inputs, dynamic_dims: Mapping[str | int, Mapping[int, str]] | None = None) -> DynamicDims:
    """Dim 0 of every tensor input is the batch; dim 1 of an integer 2-D keyword input (token ids,
    attention masks) is the sequence. `dynamic_dims` adds or renames axes, keyed by keyword name or
    by position."""
    keyword = isinstance(inputs, Mapping)
    values = dict(inputs) if keyword else dict(enumerate(inputs))
    dims: DynamicDims = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            dims[key] = {0: BATCH}
            if keyword and value.dim() == 2 and not value.dtype.is_floating_point:
                dims[key][1] = SEQUENCE
    for key, axes in (dynamic_dims or {}).items():
        if key not in values:
            raise InputError(f"dynamic_dims names input {key!r}, which is not among the example inputs")
        dims.setdefault(key, {}).update(axes)
    return dims


def export_capture(model: nn.Module, inputs: Inputs, dims: DynamicDims | None = None) -> fx.GraphModule:
    """torch.export (non-strict) with every named axis dynamic (Dim.AUTO: equal axes are inferred).
    An axis of size 1 is grown first: torch.export specializes sizes 0 and 1."""
    dims = dynamic_dims_of(inputs) if dims is None else dims
    values = inputs if isinstance(inputs, Mapping) else dict(enumerate(inputs))
    for axis in _axes(dims):
        if any(values[key].shape[dim] < 2 for key, axes in dims.items() for dim, name in axes.items() if name == axis):
            inputs = resized_inputs(inputs, dims, axis)

    def dynamic(key: str | int) -> object:
        return {dim: torch.export.Dim.AUTO for dim in dims[key]} if key in dims else None

    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
        shapes: object = {key: dynamic(key) for key in kwargs}
    else:
        args, kwargs = tuple(inputs), {}
        shapes = tuple(dynamic(index) for index in range(len(args)))
    program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    return _plain_graph_module(program.module())


def _plain_graph_module(module: fx.GraphModule) -> fx.GraphModule:
    """ExportedProgram.module() holds shape-guard hooks that cannot be pickled; rebuild it as a plain
    GraphModule (same graph, pytree calling convention kept) without the guard call."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._tracer_cls = None
    return fx.GraphModule(module, graph, module.__class__.__name__)


def resized_inputs(inputs: Inputs, dims: DynamicDims, axis: str) -> Inputs:
    """The inputs with every dim called `axis` resized, reusing existing slices so that token ids and
    masks stay valid: the batch grows by one; other axes shrink by one unless shorter than 3."""

    def resize(key: str | int, value: object) -> object:
        for dim, name in dims.get(key, {}).items():
            if name == axis:
                size = value.shape[dim]
                grow = axis == BATCH or size < 3
                value = torch.cat([value, value.narrow(dim, 0, 1)], dim) if grow else value.narrow(dim, 0, size - 1)
        return value

    if isinstance(inputs, Mapping):
        return {key: resize(key, value) for key, value in inputs.items()}
    return tuple(resize(index, value) for index, value in enumerate(inputs))


def _leaf_reason(module: nn.Module) -> str:
    if type(module) in LEAF_MODULES:
        return LEAF_MODULES[type(module)]
    if type(module) in _timm_registry()[0]:
        return "in timm's registry of modules fx cannot trace"
    return "torch.nn modules are leaves of fx tracing"


def hidden_layers(gm: fx.GraphModule) -> list[Site]:
    """Compressible layers of the captured model (nn.Linear, pointwise nn.Conv2d and nn.Conv1d) that
    the graph does not expose as sites: inside a leaf module, or with their weight handed to a
    function fx does not trace into. They are sites with status "hidden" and the reason."""
    layers = gm.meta.get(LAYERS_KEY)
    if layers is None:
        layers = {name: layout for name, module in gm.named_modules() if (layout := compressible_module(module))}
    exposed = {match.weight for match in match_sites(gm)}
    readers: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            for user in node.users:
                readers.setdefault(node.target, user)
    leaves = [node for node in gm.graph.nodes if node.op == "call_module"]
    hidden = []
    for name, layout in layers.items():
        weight_target = f"{name}.weight"
        if weight_target in exposed:
            continue
        leaf = next((node for node in leaves if name.startswith(f"{node.target}.")), None)
        if leaf is not None:
            module = gm.get_submodule(leaf.target)
            node, reason = leaf, f"inside leaf module {leaf.target} ({type(module).__name__}: {_leaf_reason(module)})"
        elif weight_target in readers:
            node = readers[weight_target]
            reader = getattr(node.target, "__name__", str(node.target))
            node, reason = node, f"weight read by {reader}, which fx does not trace into"
        else:
            continue  # the graph does not use this layer
        weight = gm.get_parameter(weight_target)
        bias = f"{name}.bias" if _has_parameter(gm, f"{name}.bias") else None
        hidden.append(Site(name, node.name, "call_module", weight.shape[1], weight.shape[0], weight_target, bias, "hidden", reason, layout=layout))
    return hidden


def _has_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


# Modules that wrap the model without computing anything of their own, and the attribute holding it:
# fx cannot trace them (no forward of their own, or a scatter over devices). torch.compile's wrapper is
# the third kind (`_wrapped_attribute`).
_WRAPPERS: dict[type[nn.Module], str] = {
    nn.DataParallel: "module",
    nn.parallel.DistributedDataParallel: "module",
}


def _wrapped_attribute(model: nn.Module) -> str | None:
    """The attribute holding the module `model` wraps, or None when it is not a wrapper."""
    # torch.compile's OptimizedModule is looked up only where a model was compiled, which loads its module:
    # importing torch._dynamo here would add two seconds to every start of the command line.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return "_orig_mod"
    return next((attribute for wrapper, attribute in _WRAPPERS.items() if isinstance(model, wrapper)), None)


def working_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` for capture to work on (the user's model is never modified): of the
    module a wrapper holds (torch.compile, `_WRAPPERS`: compile or parallelize the compact model again), with every
    parametrization (torch.nn.utils.parametrize: weight_norm, spectral_norm, ...) baked into a plain
    parameter of its current value: a parametrized weight is computed, not a parameter a site can hold."""
    while wrapped := _wrapped_attribute(model):
        model = getattr(model, wrapped)
    try:
        copied = copy.deepcopy(model)
    except Exception as error:
        raise InputError(
            f"the model cannot be copied ({type(error).__name__}: {first_line(error)}); tunecomp works on a copy "
            "so that your model is never modified. The usual cause is torch.nn.utils.weight_norm's hooks: use "
            "torch.nn.utils.parametrizations.weight_norm, or call torch.nn.utils.remove_weight_norm(module) first"
        ) from error
    for module in list(copied.modules()):
        if parametrize.is_parametrized(module):
            with torch.no_grad():
                values = {name: getattr(module, name).clone() for name in module.parametrizations}
            # parametrize.remove_parametrizations would delete the property from the parametrized class,
            # which the copy shares with the user's model: the copy takes the plain class back instead
            module.__class__ = type(module).__bases__[0]
            del module.parametrizations
            for name, value in values.items():
                module.register_parameter(name, nn.Parameter(value))
    return copied


@contextmanager
def without_attention_fast_path() -> Iterator[None]:
    """nn.MultiheadAttention's and nn.TransformerEncoder's eval-mode fast path off: with a key padding
    mask the encoder runs on nested tensors and zeroes the padded positions, which no captured graph
    reproduces. The model is captured, and checked against, the computation it runs in training mode."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def check_inputs_fit(model: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    """Check the model holds real weights and the inputs sit on its device, then run it once on the
    example inputs (without the attention fast path, as capture runs it); a failure is the user's
    input, not our bug."""
    _check_materialized(model)
    _check_same_device(model, inputs)
    try:
        with torch.no_grad(), without_attention_fast_path():
            outputs = flatten_outputs(call_model(model, inputs))
    except Exception as error:
        raise InputError(
            f"the example inputs do not fit the model ({type(error).__name__}: {first_line(error)}). "
            f"Got {describe_inputs(inputs)}; the model's weights are {_describe_weights(model)}. "
            "Pass a tuple of tensors in the order of forward()'s arguments, or a dict of keyword tensors, "
            "with the shapes, dtypes and device the model expects"
        ) from error
    for index, output in enumerate(outputs):
        if output.is_floating_point() and not torch.isfinite(output).all():
            raise InputError(
                f"the model's output {index} on the example inputs holds NaN or inf ({int((~torch.isfinite(output)).sum())} "
                f"of {output.numel()} values); every pass is checked against these outputs, so they must be finite. "
                "Check the weights (NaN or inf loaded from a checkpoint) and the example inputs"
            )
    return outputs


def _check_materialized(model: nn.Module) -> None:
    on_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise InputError(
            f"{len(on_meta)} parameters and buffers of {model.__class__.__name__} are on the meta device "
            f"(e.g. '{on_meta[0]}'): they have shapes but no values, so there is nothing to compress. "
            "Materialize the weights first, e.g. model.to_empty(device='cpu') then "
            "model.load_state_dict(state_dict), or load the model without device='meta'"
        )


def _check_same_device(model: nn.Module, inputs: Inputs) -> None:
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) != 1:
        return  # no weights, or a model spread over devices on purpose: let the model decide
    device = devices.pop()
    for name, tensor in named_tensors(inputs):
        if tensor.device != device:
            raise InputError(
                f"example input {name} is on device '{tensor.device}' but the model's weights are on '{device}'; "
                f"move the inputs with .to('{device}') (or the model with .to('{tensor.device}'))"
            )


def _describe_weights(model: nn.Module) -> str:
    weights = list(model.parameters())
    if not weights:
        return "absent (the model has no parameters)"
    dtypes = sorted({str(w.dtype) for w in weights})
    devices = sorted({str(w.device) for w in weights})
    return f"{'/'.join(dtypes)} on {'/'.join(devices)}"


def capture(
    model: nn.Module,
    inputs: Inputs,
    reference: list[torch.Tensor] | None = None,
    dynamic_dims: Mapping[str | int, Mapping[int, str]] | None = None,
) -> Capture:
    """Capture `model` as a GraphModule that reproduces it on `inputs`.

    Symbolic tracing comes first; torch.export is tried when tracing fails or leaves compressible
    layers hidden inside leaf modules, and is used when it reproduces the model, also at new sizes
    of every dynamic axis (`dynamic_dims_of`). The attention fast path is off throughout
    (`without_attention_fast_path`)."""
    with without_attention_fast_path():
        return _capture(model, inputs, check_inputs_fit(model, inputs) if reference is None else reference, dynamic_dims)


def _capture(
    model: nn.Module, inputs: Inputs, reference: list[torch.Tensor], dynamic_dims: Mapping[str | int, Mapping[int, str]] | None
) -> Capture:
    layers = {name: layout for name, module in model.named_modules() if (layout := compressible_module(module))}
    traced = trace_error = None
    try:
        traced = symbolic_capture(model, inputs)
        traced.meta[LAYERS_KEY] = layers
        _check_reproduces(traced, inputs, reference)
    except Exception as error:
        traced, trace_error = None, error
        why = f"symbolic tracing failed ({type(error).__name__}: {first_line(error)})"
    else:
        hidden = hidden_layers(traced)
        if not hidden:
            return Capture(traced, "symbolic_trace", "symbolic tracing succeeded")
        holders = sorted({site.reason.split(" (")[0] for site in hidden})
        why = f"symbolic tracing hides {len(hidden)} compressible layers ({'; '.join(holders[:3])}{'; ...' if len(holders) > 3 else ''})"
    dims = dynamic_dims_of(inputs, dynamic_dims)
    try:
        exported = export_capture(model, inputs, dims)
        exported.meta[LAYERS_KEY] = layers
        _check_reproduces(exported, inputs, reference)
        _check_dynamic(model, exported, inputs, dims)
    except Exception as export_error:
        export_why = f"torch.export failed ({type(export_error).__name__}: {first_line(export_error)})"
        if traced is not None:
            return Capture(traced, "symbolic_trace", f"{why}; {export_why}, so they stay dense")
        where = _user_code(export_error, model) or _user_code(trace_error, model)
        # A Hugging Face model returns its key/value cache object, which neither path can hold.
        caching = getattr(getattr(model, "config", None), "use_cache", False) is True
        raise CaptureError(
            f"could not capture {model.__class__.__name__}: {why}; {export_why}."
            + (" The model returns its key/value cache (config.use_cache is True): set model.config.use_cache = False." if caching else "")
            + (f" The construct that stops both is at {where}." if where else "")
            + " Rewrite it without Python control flow on tensor values (e.g. torch.where instead of "
            "`if tensor:`), or register the module that holds it with "
            "tunecomp_fx.capture.register_leaf_module(Type, reason), or the function, with "
            "tunecomp_fx.capture.register_wrapped_function(function, reason), so that it stays one opaque call"
        ) from export_error
    axes = _axes(dims)
    plural = "s" if len(axes) > 1 else ""
    return Capture(exported, "torch.export", f"{why}; used torch.export with dynamic {' and '.join(axes)} dimension{plural}")


def _check_reproduces(gm: fx.GraphModule, inputs: Inputs, reference: list[torch.Tensor]) -> None:
    with torch.no_grad():
        outputs = flatten_outputs(call_model(gm, inputs))
    if len(outputs) != len(reference) or not all(
        o.shape == r.shape and torch.allclose(o.float(), r.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
        for o, r in zip(outputs, reference)
    ):
        raise CaptureError("the captured graph does not reproduce the model's outputs")


def _axes(dims: DynamicDims) -> list[str]:
    return sorted({name for axes in dims.values() for name in axes.values()})


def _check_dynamic(model: nn.Module, gm: fx.GraphModule, inputs: Inputs, dims: DynamicDims) -> None:
    """The exported graph must run, and match the model, at a new size of every dynamic axis: Dim.AUTO
    specializes an axis silently when the model's code fixes it."""
    for axis in _axes(dims):
        resized = resized_inputs(inputs, dims, axis)
        try:
            with torch.no_grad():
                reference = flatten_outputs(call_model(model, resized))
        except Exception:
            continue  # the model itself does not take another size on this axis
        try:
            _check_reproduces(gm, resized, reference)
        except Exception as error:
            raise CaptureError(
                f"the exported graph does not run at a new {axis} size ({first_line(error)}): the model's "
                f"code fixes that axis"
            ) from error


_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _user_code(error: BaseException | None, model: nn.Module) -> str | None:
    """Where in the model's own code `error` (or its cause) was raised: file:line, the module's name
    and class, and the line of source; None when no frame of the traceback is the model's code."""
    module_names = {id(module): name for name, module in model.named_modules()}
    innermost = None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for frame, line in traceback.walk_tb(error.__traceback__):
            filename = frame.f_code.co_filename
            if filename.startswith(_LIBRARY_DIRS) or not os.path.isfile(filename):
                continue
            code = frame.f_code
            owner = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
            innermost = (filename, line, code.co_name, owner)
        error = error.__cause__ or error.__context__
    if innermost is None:
        return None
    filename, line, function, owner = innermost
    source = linecache.getline(filename, line).strip()
    if isinstance(owner, nn.Module) and id(owner) in module_names:
        name = module_names[id(owner)]
        function = f"{type(owner).__name__}.{function}" + (f" of module '{name}'" if name else " (the root module)")
    return f"{filename}:{line} in {function}: `{source}`"
