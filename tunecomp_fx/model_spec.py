"""Turn a model spec from the command line into a model and example inputs.

    timm:NAME                 timm.create_model(NAME), random init unless pretrained
    torchvision:NAME          torchvision.models.get_model(NAME), random init unless pretrained
    path/to/folder            a Hugging Face folder (config.json + weights), loaded offline
    module.path:factory       factory(**kwargs) returning a model, or (model, example_inputs)

Example inputs are random tensors of the given shape (default: the model's own input size, batch
1); a factory may return its own."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunecomp_fx.errors import InputError
from tunecomp_fx.inputs import Inputs, normalize_inputs

SPEC_HELP = "timm:NAME, torchvision:NAME, a Hugging Face model folder, or module.path:factory"
_DEFAULT_SEQUENCE = 128


@dataclass
class LoadedModel:
    model: nn.Module
    example_inputs: Inputs
    source: str  # what was loaded, for messages


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"input shape {text!r} is not a comma-separated list of integers, e.g. 1,3,224,224") from None
    if not shape or any(size < 1 for size in shape):
        raise InputError(f"input shape {text!r} needs positive sizes, e.g. 1,3,224,224")
    return shape


def close_names(name: str, names: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _construct(spec: str, pretrained: bool, build: Callable[[], nn.Module]) -> nn.Module:
    """Call a library's model constructor; its failures become errors that say what to change."""
    try:
        return build()
    except TypeError as error:
        raise InputError(f"{spec} does not take these --model-kwargs: {error}") from error
    except Exception as error:
        if not pretrained:
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"could not load pretrained weights for {spec} ({type(error).__name__}: {first}); without network "
            "access put the weights in the local cache (HF_HOME / TORCH_HOME) or drop --pretrained for random init"
        ) from error


def _image_inputs(channels_hw: Sequence[int], shape: tuple[int, ...] | None) -> tuple[torch.Tensor]:
    return (torch.randn(shape if shape is not None else (1, *channels_hw)),)


def _load_timm(name: str, shape: tuple[int, ...] | None, pretrained: bool, kwargs: dict[str, Any]) -> LoadedModel:
    import timm

    if not timm.is_model(name):
        raise InputError(f"timm has no model '{name}'{close_names(name, timm.list_models())}")
    model = _construct(f"timm:{name}", pretrained, lambda: timm.create_model(name, pretrained=pretrained, **kwargs))
    channels, height, width = timm.data.resolve_model_data_config(model)["input_size"]
    if "img_size" in kwargs:  # the config keeps the pretrained size; the model was built for this one
        size = kwargs["img_size"]
        height, width = (size, size) if isinstance(size, int) else size
    return LoadedModel(model, _image_inputs((channels, height, width), shape), f"timm:{name}")


def _load_torchvision(name: str, shape: tuple[int, ...] | None, pretrained: bool, kwargs: dict[str, Any]) -> LoadedModel:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise InputError(f"torchvision has no model '{name}'{close_names(name, names)}")
    weights = "DEFAULT" if pretrained else None
    model = _construct(f"torchvision:{name}", pretrained, lambda: torchvision.models.get_model(name, weights=weights, **kwargs))
    return LoadedModel(model, _image_inputs((3, 224, 224), shape), f"torchvision:{name}")


def _load_huggingface(folder: Path, shape: tuple[int, ...] | None, kwargs: dict[str, Any]) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        architecture = (getattr(config, "architectures", None) or ["AutoModel"])[0]
        model_class = getattr(transformers, architecture, transformers.AutoModel)
        model = model_class.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as error:
        raise InputError(f"could not load a Hugging Face model from {folder}: {type(error).__name__}: {error}") from error
    if model.main_input_name == "pixel_values":
        size = getattr(config, "image_size", 224)
        inputs: Inputs = {"pixel_values": _image_inputs((getattr(config, "num_channels", 3), size, size), shape)[0]}
    else:
        if shape is not None and len(shape) != 2:
            raise InputError(f"a text model takes --input-shape BATCH,SEQUENCE; got {','.join(map(str, shape))}")
        longest = getattr(config, "max_position_embeddings", _DEFAULT_SEQUENCE)
        batch, length = shape if shape is not None else (1, min(_DEFAULT_SEQUENCE, longest))
        inputs = {
            "input_ids": torch.randint(0, config.vocab_size, (batch, length)),
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
        }
    return LoadedModel(model, inputs, f"Hugging Face folder {folder} ({architecture})")


def import_object(spec: str, role: str, expected: str) -> Any:
    """The object a `module.path:name` spec names, imported from the working directory too. `role`
    ("model spec", "data spec") and `expected` (what the name should be) word the errors."""
    module_name, _, attribute = spec.rpartition(":")
    if os.getcwd() not in sys.path:  # console scripts do not put the working directory on sys.path
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"cannot import '{module_name}' for {role} {spec}: {error}") from error
    if not hasattr(module, attribute):
        raise InputError(f"'{module_name}' has no {expected} '{attribute}' ({role} {spec})")
    return getattr(module, attribute)


def _load_factory(spec: str, shape: tuple[int, ...] | None, kwargs: dict[str, Any]) -> LoadedModel:
    factory: Callable[..., Any] = import_object(spec, "model spec", "callable")
    if not callable(factory):
        raise InputError(f"{spec} is a {type(factory).__name__}, not a callable that returns a model")
    made = factory(**kwargs)
    model, inputs = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec} returned {type(model).__name__}; it must return an nn.Module or (module, example_inputs)")
    if shape is not None:
        inputs = (torch.randn(shape),)
    if inputs is None:
        raise InputError(f"{spec} returned no example inputs; give --input-shape, e.g. --input-shape 1,16")
    return LoadedModel(model, normalize_inputs(inputs), spec)


def load_model(
    spec: str,
    *,
    input_shape: tuple[int, ...] | None = None,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build the model a spec names (in eval mode) and its example inputs; see the module docstring."""
    kwargs = dict(model_kwargs or {})
    if pretrained and not spec.startswith(("timm:", "torchvision:")):
        raise InputError("--pretrained applies to timm: and torchvision: models; a folder or factory brings its own weights")
    torch.manual_seed(seed)
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise InputError(f"{spec} is a folder but not a Hugging Face model folder (no config.json)")
        loaded = _load_huggingface(Path(spec), input_shape, kwargs)
    elif spec.startswith("timm:"):
        loaded = _load_timm(spec.removeprefix("timm:"), input_shape, pretrained, kwargs)
    elif spec.startswith("torchvision:"):
        loaded = _load_torchvision(spec.removeprefix("torchvision:"), input_shape, pretrained, kwargs)
    elif ":" in spec:
        loaded = _load_factory(spec, input_shape, kwargs)
    else:
        raise InputError(f"model spec {spec!r} is not {SPEC_HELP} (a folder that does not exist?)")
    loaded.model.eval()
    return loaded
