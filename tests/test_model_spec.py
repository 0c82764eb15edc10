"""Model specs of the command line: timm, torchvision, a Hugging Face folder, module.path:factory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunecomp_fx.errors import InputError
from tunecomp_fx.model_spec import load_model, parse_shape


def test_timm_spec_uses_the_model_kwargs_image_size() -> None:
    pytest.importorskip("timm")
    loaded = load_model("timm:vit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 1})
    (x,) = loaded.example_inputs
    assert x.shape == (1, 3, 32, 32) and len(loaded.model.blocks) == 1 and not loaded.model.training
    assert loaded.model(x).shape == (1, 1000)
    assert load_model("timm:resnet18").example_inputs[0].shape == (1, 3, 224, 224)
    with pytest.raises(InputError, match="does not take these --model-kwargs"):
        load_model("timm:resnet18", model_kwargs={"no_such_option": 1})


def test_torchvision_spec_with_shape_and_kwargs() -> None:
    pytest.importorskip("torchvision")
    loaded = load_model("torchvision:mobilenet_v3_small", input_shape=(2, 3, 96, 96), model_kwargs={"num_classes": 7})
    assert loaded.example_inputs[0].shape == (2, 3, 96, 96)
    assert loaded.model(*loaded.example_inputs).shape == (2, 7)


def test_hugging_face_folder_spec(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, num_labels=3,
    )  # fmt: skip
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    ids, mask = loaded.example_inputs["input_ids"], loaded.example_inputs["attention_mask"]
    assert ids.shape == mask.shape == (1, 40)  # the default 128 tokens, capped at the model's 40 positions
    assert int(ids.max()) < 50 and bool(mask.all())
    assert load_model(str(tmp_path), input_shape=(3, 8)).example_inputs["input_ids"].shape == (3, 8)
    with pytest.raises(InputError, match="a text model takes --input-shape BATCH,SEQUENCE"):
        load_model(str(tmp_path), input_shape=(1, 3, 8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a Hugging Face model folder"):
        load_model(str(tmp_path / "empty"))


def test_factory_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).parent)  # a user's module is found on the working directory
    loaded = load_model("cli_models:two_layer")
    assert loaded.example_inputs[0].shape == (4, 64)
    assert load_model("cli_models:two_layer_without_inputs", input_shape=(5, 64)).example_inputs[0].shape == (5, 64)
    with pytest.raises(InputError, match="has no callable 'nothing'"):
        load_model("cli_models:nothing")
    with pytest.raises(InputError, match="cannot import 'no_such_module'"):
        load_model("no_such_module:factory")


def test_shapes() -> None:
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape("2x128") == (2, 128)
    for bad in ("", "1,,2", "1,0", "a"):
        with pytest.raises(InputError):
            parse_shape(bad)
