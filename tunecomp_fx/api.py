"""The public entry points: prepare (capture + analysis + teacher/student rewrite), finalize
(fold, prune, densify, clean up) and compress (both in a row), after the prepare/convert split
of torch.ao.quantization.fx."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from torch import fx, nn

from tunecomp_fx.capture import capture, check_inputs_fit, working_copy
from tunecomp_fx.config import CompressionConfig
from tunecomp_fx.errors import CalibrationError, ConfigError, InputError, PassError
from tunecomp_fx.inputs import Inputs, normalize_inputs
from tunecomp_fx.metrics import count_macs, count_parameters
from tunecomp_fx.passes.allocate_ranks import AllocateRanks
from tunecomp_fx.passes.build_union_bases import BuildUnionBases
from tunecomp_fx.passes.calibrate_input_covariance import CalibrateInputCovariance
from tunecomp_fx.passes.calibrate_output_gradients import CalibrateOutputGradients
from tunecomp_fx.passes.decompose_weights import DecomposeWeights
from tunecomp_fx.passes.densify_past_break_even import DensifyPastBreakEven
from tunecomp_fx.passes.eliminate_pruned_neurons import EliminatePrunedNeurons
from tunecomp_fx.passes.eliminate_dead_code import EliminateDeadCode
from tunecomp_fx.passes.eliminate_pruned_ranks import EliminatePrunedRanks
from tunecomp_fx.passes.find_hidden_widths import FindHiddenWidths
from tunecomp_fx.passes.find_linear_sites import FindLinearSites
from tunecomp_fx.passes.fold_constant_biases import FoldConstantBiases
from tunecomp_fx.passes.fold_sliced_weights import FoldSlicedWeights
from tunecomp_fx.passes.transpose_input_major_weights import TransposeInputMajorWeights
from tunecomp_fx.passes.fold_blends import FoldBlends
from tunecomp_fx.passes.fold_cores import FoldCores
from tunecomp_fx.passes.initialize_students import InitializeStudents
from tunecomp_fx.passes.insert_teacher_student import InsertTeacherStudent
from tunecomp_fx.passes.select_hidden_neurons import SelectHiddenNeurons
from tunecomp_fx.per_channel import channels_key, site_parameters
from tunecomp_fx.pipeline import GraphPass, PassContext, PassRecord, run_passes
from tunecomp_fx.pruning import RankPruner
from tunecomp_fx.report import CompressionReport, SiteRow
from tunecomp_fx.sites import LOWRANK_ROOT, HiddenWidth, Site, set_blend

STATE_KEY = "tunecomp"  # prepared GraphModule.meta key holding the PreparedState
REPORT_KEY = "tunecomp_report"  # compact GraphModule.meta key: the report as a plain dict
CONFIG_KEY = "tunecomp_config"


def prepare_passes(config: CompressionConfig) -> list[GraphPass]:
    if config.method == "union":
        analysis: list[GraphPass] = [CalibrateInputCovariance(), CalibrateOutputGradients(), BuildUnionBases()]
    elif config.prunes_widths:
        analysis = [FindHiddenWidths(), CalibrateInputCovariance(), SelectHiddenNeurons(), DecomposeWeights()]
    else:
        analysis = [CalibrateInputCovariance(), DecomposeWeights()]
    return [TransposeInputMajorWeights(), FoldSlicedWeights(), FoldConstantBiases(), FindLinearSites(), *analysis, AllocateRanks(), InsertTeacherStudent(), InitializeStudents()]


def finalize_passes() -> list[GraphPass]:
    return [FoldBlends(), FoldCores(), EliminatePrunedRanks(), EliminatePrunedNeurons(), DensifyPastBreakEven(), EliminateDeadCode()]


@dataclass
class PreparedState:
    """What finalize needs to know about a prepared model."""

    context: PassContext
    capture_path: str
    capture_reason: str
    example_inputs: Inputs
    params_before: int
    macs_before: int


def _make_config(config: CompressionConfig | None, ratio: float | None, options: dict[str, Any]) -> CompressionConfig:
    if config is None:
        config = CompressionConfig(**({"ratio": ratio} if ratio is not None else {}), **options)
    elif ratio is not None or options:
        overrides = {**options, **({"ratio": ratio} if ratio is not None else {})}
        config = replace(config, **overrides)
    if config.rank_slack is None:  # unset: a trained run (joint_compress) has set its default by now
        config = replace(config, rank_slack=0.0)
    return config


def prepare(
    model: nn.Module,
    example_inputs: Any,
    ratio: float | None = None,
    *,
    config: CompressionConfig | None = None,
    calib: Iterable[Any] | None = None,
    progress: bool = False,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    dynamic_dims: dict[str | int, dict[int, str]] | None = None,
    **options: Any,
) -> fx.GraphModule:
    """Capture `model` and rewrite every compressible linear site into a teacher/student subgraph
    with activation-aware initialized students (alpha = 1: outputs equal the original's).

    `calib` is an iterable of input batches (tuples or dicts) used for calibration; by default the
    example inputs. method="union" needs labelled batches instead, (inputs, targets) pairs, and
    differentiates `loss_fn(outputs, targets)` (default cross-entropy) at every site.
    `dynamic_dims` names input axes that must stay dynamic when capture falls back to torch.export,
    beyond the defaults of `tunecomp_fx.capture.dynamic_dims_of` (batch, and the sequence of integer
    2-D keyword inputs). Options are CompressionConfig fields (init=, allocation=, exclude=, method=, ...)."""
    try:
        config = _make_config(config, ratio, options)
    except TypeError as error:
        raise ConfigError(f"{error}; see tunecomp_fx.CompressionConfig for the options") from error
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    model = working_copy(model).eval()  # the user's model is never modified
    start = time.perf_counter()
    reference = check_inputs_fit(model, inputs)
    params_before = count_parameters(model)
    captured = capture(model, inputs, reference, dynamic_dims)
    # Counted on the captured graph, the same ops the compact model's count sees: the eager model may
    # take fused kernels the counter misses (nn.MultiheadAttention's fast path in eval mode).
    macs_before = count_macs(captured.graph_module, inputs)
    if progress:
        print(f"captured with {captured.path}: {captured.reason} ({time.perf_counter() - start:.1f} s)")
    if calib is not None and not isinstance(calib, Iterable):
        raise InputError(f"calib must be an iterable of input batches (tuples or dicts); got {type(calib).__name__}")
    if config.method == "union":
        batches, targets = _labelled(calib)
    elif calib is None:
        batches, targets = [inputs], []
    else:
        batches, targets = [normalize_inputs(batch, f"calibration batch {index}") for index, batch in enumerate(calib)], []
    context = PassContext(
        config=config, calibration=batches, calibration_targets=targets, check_inputs=inputs, loss_fn=loss_fn, capture_reason=captured.reason
    )
    context.log.append(PassRecord("capture", time.perf_counter() - start, (), ()))
    gm = run_passes(captured.graph_module, prepare_passes(config), context, progress=progress)
    # The covariances and full factorizations are large and have served their purpose.
    context.covariances.clear()
    context.gradient_covariances.clear()
    context.decompositions.clear()
    context.lookup_counts.clear()
    context.calibration = context.calibration_targets = ()
    gm.meta[STATE_KEY] = PreparedState(context, captured.path, captured.reason, inputs, params_before, macs_before)
    return gm


def _labelled(calib: Iterable[Any] | None) -> tuple[list[Inputs], list[Any]]:
    """Split labelled calibration batches into inputs and targets."""
    if calib is None:
        raise CalibrationError(
            "method='union' calibrates on the loss's gradients and needs labelled batches: pass "
            "calib=[(inputs, targets), ...], or data= to compress (its first batches are used)"
        )
    batches, targets = [], []
    for index, batch in enumerate(calib):
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise CalibrationError(
                f"method='union' needs (inputs, targets) calibration batches; batch {index} is a "
                f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
            )
        batches.append(normalize_inputs(batch[0]))
        targets.append(batch[1])
    return batches, targets


def prepared_state(prepared: fx.GraphModule) -> PreparedState:
    state = prepared.meta.get(STATE_KEY) if isinstance(prepared, fx.GraphModule) else None
    if state is None:
        raise InputError("this model was not made by tunecomp_fx.prepare; call prepare(model, example_inputs) first")
    return state


def prune_slack(prepared: fx.GraphModule) -> None:
    """Prune the slack (rank_slack, width_slack) a prepared model's students still hold at once, as
    the end of the blend would: the least important ranks (neurons, heads) are masked off. For a
    run stopped before the end of its blend, and for training-free use of a model prepared with slack."""
    RankPruner(prepared, prepared_state(prepared).context).update(1.0)


def finalize(prepared: fx.GraphModule, *, inplace: bool = False, progress: bool = False) -> fx.GraphModule:
    """Fold the blends (alpha must be 0), eliminate pruned ranks, turn sites past break-even back
    into dense linears and remove dead code. The result holds only standard torch modules and ops;
    its report is `tunecomp_fx.get_report(compact)`."""
    state = prepared_state(prepared)
    compact = prepared if inplace else copy.deepcopy(prepared)
    compact.meta.pop(STATE_KEY, None)
    context = state.context
    compact = run_passes(compact, finalize_passes(), context, progress=progress)
    _check_package_free(compact)
    report = build_report(compact, state)
    compact.meta[REPORT_KEY] = report.to_dict()
    compact.meta[CONFIG_KEY] = context.config.to_dict()
    return compact


def compress(
    model: nn.Module,
    example_inputs: Any,
    ratio: float | None = None,
    *,
    config: CompressionConfig | None = None,
    calib: Iterable[Any] | None = None,
    progress: bool = False,
    data: Iterable[Any] | None = None,
    eval_data: Iterable[Any] | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    dynamic_dims: dict[str | int, dict[int, str]] | None = None,
    **options: Any,
) -> fx.GraphModule:
    """Without `data`: training-free compression (prepare, set every blend to the student, finalize).

    With `data` (batches of (inputs, targets)): joint fine-tuning and compression for `steps` or
    `epochs` (prepare with slack rank -> JointTrainer -> finalize); options may then also be
    TrainingConfig fields (lr=, blend=, ...) and JointTrainer's (loss_fn=, checkpoint_dir=, ...)."""
    if data is not None:
        from tunecomp_fx.train import joint_compress  # the driver builds on prepare/finalize here

        return joint_compress(
            model, example_inputs, ratio, config=config, calib=calib, progress=progress,
            data=data, eval_data=eval_data, steps=steps, epochs=epochs, dynamic_dims=dynamic_dims, **options,
        )
    if eval_data is not None or steps is not None or epochs is not None:
        raise ConfigError("eval_data, steps and epochs apply to joint training: pass the training batches as data=")
    prepared = prepare(
        model, example_inputs, ratio, config=config, calib=calib, progress=progress, dynamic_dims=dynamic_dims, **options
    )
    prune_slack(prepared)  # without a run to shrink it over
    set_blend(prepared, 0.0)
    return finalize(prepared, inplace=True, progress=progress)


def _check_package_free(compact: fx.GraphModule) -> None:
    """The compact model must load and run without this package: no module or function of ours is left."""
    ours = [f"module '{name}' ({type(m).__name__})" for name, m in compact.named_modules() if _is_ours(type(m))]
    ours += [f"node '{n.name}' ({n.target})" for n in compact.graph.nodes if n.op == "call_function" and _is_ours(n.target)]
    if ours:
        raise PassError(f"finalize left parts of tunecomp_fx in the compact model: {', '.join(ours[:3])}")


def _is_ours(thing: object) -> bool:
    return (getattr(thing, "__module__", None) or "").startswith("tunecomp_fx")


def _kept_neurons(site: Site, widths: list[HiddenWidth]) -> str:
    """What width pruning kept of a site, e.g. "768 of 1536 output neurons kept", with the heads when
    they were pruned: "128 of 384 output neurons kept (4 of 12 heads)", or a grouped convolution's
    groups: "48 of 96 input neurons kept (6 of 12 groups)"."""
    out_features, in_features = site.unpruned_shape or (site.out_features, site.in_features)
    kept = [f"{site.out_features} of {out_features} output" if site.kept_rows is not None else "",
            f"{site.in_features} of {in_features} input" if site.kept_columns is not None else ""]
    groups = "".join(_heads_kept(site, w) for w in widths if w.kind == "heads" and site.name in w.sites)
    grouped = [w for w in widths if w.kind == "neurons" and w.group > 1 and site.name in w.sites]
    groups += "".join(f" ({(site.in_features if site.name == w.down else site.out_features) // w.group} of {w.width // w.group} groups)" for w in grouped)
    return f"{' and '.join(filter(None, kept))} neurons kept{groups}"


def _heads_kept(site: Site, width: HiddenWidth) -> str:
    """" (2 of 4 heads)" for a site of a heads width; for one holding query and grouped-query key/value
    parts (Phi-3's qkv_proj): " (2 of 4 query heads, 1 of 2 key/value heads)"."""
    if site.name == width.down:
        repeats, kept = (1,), site.in_features
    else:  # the query neurons kept: each part keeps the same share of its neurons (a shared key/value head whole)
        repeats = width.repeats_of(site.name)
        pruned = site.out_features - width.head_dim * repeats.count(0)
        kept = width.width * pruned // max(sum(width.width // shared_by for shared_by in repeats if shared_by), 1)
    named = len(set(repeats)) > 1
    counts = [
        f"{kept // shared_by // width.head_dim} of {width.width // shared_by // width.head_dim} {('key/value ' if shared_by > 1 else 'query ') * named}heads"
        if shared_by else "the key/value head they share"
        for shared_by in sorted(set(repeats), key=lambda shared_by: shared_by or width.width)
    ]  # fmt: skip
    return f" ({', '.join(counts)})"


def _final_shape(container: nn.Module) -> tuple[int, int]:
    """(out, in) of a finalized student: its dense weight's, or its factors'."""
    if hasattr(container, "dense"):
        return container.dense.weight.shape[0], container.dense.weight.shape[1]
    return container.up.weight.shape[0], container.down.weight.shape[1]


def _squeeze_copy(lowrank: nn.Module, site: Site, context: PassContext) -> nn.Module:
    """The copy of a squeeze-excitation's layer that the width it sits in keeps with its down site's
    student, sliced to the kept channels (`per_channel.channels_key`)."""
    [down] = [width.down for width in context.hidden_widths if any(site.node in squeeze[1:] for squeeze in width.squeezes)]
    container = getattr(lowrank, next(s.key for s in context.sites if s.name == down))
    return getattr(container, channels_key(site.node))


def get_report(compact: fx.GraphModule) -> CompressionReport:
    data = getattr(compact, "meta", {}).get(REPORT_KEY)
    if data is None:
        raise InputError("this model has no tunecomp report; it was not made by tunecomp_fx.finalize or compress")
    return CompressionReport.from_dict(data)


def _macs(rows_per_sample: float | None, weights: int) -> int | None:
    """Per-example MACs of a site that applies `weights` to each of its input rows (None: unknown)."""
    return None if rows_per_sample is None else int(rows_per_sample * weights)


def build_report(compact: fx.GraphModule, state: PreparedState) -> CompressionReport:
    context = state.context
    rows_per_sample = context.rows_per_sample
    lowrank = getattr(compact, LOWRANK_ROOT, None)
    rows = []
    for site in context.sites:
        decision = context.ranks.get(site.name)
        before = site.unpruned_params
        out_features, in_features = site.unpruned_shape or (site.out_features, site.in_features)
        # None where calibration saw no input of its own (hidden); a table's lookups have no MACs of their own
        tokens = rows_per_sample.get(site.node) if not site.is_table else 0.0
        macs_before = _macs(tokens, in_features * out_features)
        rank = None
        if site.status == "in_width":
            copy = _squeeze_copy(lowrank, site, context)
            label, after, reason = site.status, sum(p.numel() for p in copy.parameters()), site.reason
            macs_after = _macs(tokens, sum(p.numel() for p in copy.parameters() if p.dim() > 1))  # the weight, not the bias
        elif site.status != "compress":
            label, after, reason, macs_after = site.status, before, site.reason, macs_before
        elif decision is None or decision.rank is None:
            label, after, reason, macs_after = "dense", before, decision.reason if decision else "", macs_before
        elif not hasattr(lowrank, site.key):
            label, after, reason, macs_after = "removed", 0, "its output is unused: removed as dead code", 0
        else:
            container = getattr(lowrank, site.key)
            after = site_parameters(container)
            if site.unpruned_shape is not None:  # a width pruned during training ends narrower than it started
                final_out, final_in = _final_shape(container)
                site = replace(site, out_features=final_out, in_features=final_in)
            if hasattr(container, "dense"):
                label, reason = "dense", "kept rank past break-even after pruning"
            else:
                rank = container.down.weight.shape[0]
                label, reason = "rank", ""
            if site.unpruned_shape is not None:
                reason = "; ".join(filter(None, (_kept_neurons(site, context.hidden_widths), reason)))
            if site.more_calls:
                reason = "; ".join(filter(None, (f"one student for the weight's {len(site.calls)} linear calls", reason)))
            if site.lookups:
                lookups = "its embedding lookup reads" if len(site.lookups) == 1 else f"its {len(site.lookups)} embedding lookups read"
                error = context.lookup_init_errors.get(site.name)
                looked_up = f" (init error {error:.3g} over the calibration's lookups)" if error is not None else ""
                kind = "table" if site.is_table else "tied"
                reason = "; ".join(filter(None, (f"{kind}: {lookups} the student's factors{looked_up}", reason)))
            weights = site.in_features * site.out_features if rank is None else rank * (site.in_features + site.out_features)
            macs_after = _macs(tokens, weights)
            if rank is not None and macs_after is not None:  # a lookup of the factors: rank x in MACs per id (a bag's: per bag)
                macs_after += sum(_macs(rows_per_sample.get(name), rank * site.in_features) or 0 for name in site.lookups)
        rows.append(
            SiteRow(
                site.name, site.form, out_features, in_features, label, rank, before, after,
                macs_before, macs_after, reason, site.layout, context.init_errors.get(site.name),
            )
        )
    seconds: dict[str, float] = {}
    for record in context.log:
        seconds[record.name] = seconds.get(record.name, 0.0) + record.seconds
    return CompressionReport(
        ratio=context.config.ratio,
        capture_path=state.capture_path,
        capture_reason=state.capture_reason,
        sites=tuple(rows),
        model_params_before=state.params_before,
        model_params_after=count_parameters(compact),
        model_macs_before=state.macs_before,
        model_macs_after=count_macs(compact, state.example_inputs),
        pass_seconds=seconds,
        pass_log=tuple(context.log),
    )
