"""The one frozen configuration of a compression run, saved beside every artifact."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tunecomp_fx.errors import ConfigError

INITS = ("whitened", "svd", "asvd")
ALLOCATIONS = ("uniform", "global")
METHODS = ("tunecomp", "union")
CHECK_NUMERICS_ENV = "TUNECOMP_CHECK_NUMERICS"


@dataclass(frozen=True)
class CompressionConfig:
    """What to compress and how.

    ratio: fraction of the parameters of the compressed linear sites that is *removed*
        (0.4 keeps 60% of them).
    method: "tunecomp" (activation-aware factors, both trained, slack ranks pruned) or "union"
        (task-aware union of subspaces: fixed orthonormal bases around a trained core; needs
        labelled calibration batches; no rank slack).
    init: "whitened" (activation-aware SVD, the default), "svd" (plain) or "asvd" (diagonal scaling).
    allocation: "uniform" (every site keeps the same fraction) or "global" (ranks go where they
        recover the most whitened singular-value energy per parameter).
    exclude: fnmatch patterns of site names left dense (e.g. "head", "*.fc2").
    rank_multiple: ranks are rounded to a multiple of this where it costs little (fast kernels).
    rank_slack: extra rank a student starts with, pruned away during joint training. None (the
        default) leaves it to the run: 0.5 when compress trains (data=, method="tunecomp"), 0 when
        it does not, for prepare alone and for method="union".
    prune_neurons: fraction of the neurons of every hidden width between two compressed sites
        (up -> elementwise activation -> down, as in a transformer's FFN; between pointwise
        convolutions also batch norms and depthwise convolutions, as in an inverted residual) that is
        removed, ranked by their contribution on the calibration data (0: off). Pruned neurons shrink
        the activation (and those per-channel layers) too, which factorizing the two sites cannot;
        the ranks then fill what is left of the budget.
    prune_heads: fraction of the attention heads of every block whose query, key, value and output
        projections are compressed sites around scaled_dot_product_attention or attention written
        out with matmuls and a softmax that is removed (rounded to whole heads, at least one kept),
        ranked like neurons (0: off). Removes the heads' share of the attention's own work too.
    width_slack: extra neurons (heads) of each pruned width the students start with, the least
        important pruned away during joint training as the blend progresses, like rank_slack's ranks
        (0: the width is cut once, at prepare; needs prune_neurons or prune_heads).
    compress_embeddings: also compress each embedding table that plain lookups (or sum and mean bags,
        nn.EmbeddingBag) alone read (and that has more rows than features, as a vocabulary has),
        W[ids] ~ up.weight[ids] @ down.weight (a bag: the bag of up.weight's rows @ down.weight), its rows
        weighted by how often the calibration reads them; the table then counts in the ratio's
        parameters. Saves memory, not time: each lookup adds rank x features MACs per id (a bag's: per
        bag; default off; a table tied to a linear site is compressed with it either way).
    damping: relative diagonal damping of the input covariance before whitening.
    check_numerics: after every pass that promises unchanged outputs, run the model on the example
        inputs and compare (slower; default on when the environment sets TUNECOMP_CHECK_NUMERICS=1,
        as the test suite does).
    """

    ratio: float = 0.4
    method: str = "tunecomp"
    init: str = "whitened"
    allocation: str = "uniform"
    exclude: tuple[str, ...] = ()
    rank_multiple: int = 8
    rank_slack: float | None = None
    prune_neurons: float = 0.0
    prune_heads: float = 0.0
    width_slack: float = 0.0
    compress_embeddings: bool = False
    damping: float = 1e-6
    check_numerics: bool = field(default_factory=lambda: os.environ.get(CHECK_NUMERICS_ENV) == "1")

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise ConfigError(
                f"ratio must be a number in (0, 1), the fraction of parameters to remove; got {self.ratio!r}"
            )
        if not (0.0 < float(self.ratio) < 1.0) or math.isnan(self.ratio):
            raise ConfigError(
                f"ratio={self.ratio} is outside (0, 1): it is the fraction of the compressed layers' "
                "parameters to remove, e.g. ratio=0.4 keeps 60% of them"
            )
        _check_choice("method", self.method, METHODS)
        _check_choice("init", self.init, INITS)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.rank_multiple < 1:
            raise ConfigError(f"rank_multiple must be >= 1; got {self.rank_multiple}")
        slack = self.rank_slack
        if slack is not None and (isinstance(slack, bool) or not isinstance(slack, (int, float)) or not slack >= 0):
            raise ConfigError(f"rank_slack must be a number >= 0, or None for the run's default; got {slack!r}")
        if self.method == "union" and self.rank_slack:
            raise ConfigError(
                f"method='union' trains a fixed-rank core between fixed bases and prunes no ranks; "
                f"rank_slack must be 0 (got {self.rank_slack})"
            )
        for name, what in (("prune_neurons", "each hidden width's neurons"), ("prune_heads", "each attention block's heads")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1), the fraction of {what} to remove (0: off); got {value!r}")
            if self.method == "union" and value > 0:
                raise ConfigError(f"method='union' does not prune widths; use method='tunecomp' with {name}")
        if isinstance(self.width_slack, bool) or not isinstance(self.width_slack, (int, float)) or not self.width_slack >= 0:
            raise ConfigError(f"width_slack must be a number >= 0; got {self.width_slack!r}")
        if self.width_slack > 0 and not self.prunes_widths:
            raise ConfigError(
                f"width_slack={self.width_slack} starts pruned widths wider, but no width is pruned: "
                "set prune_neurons or prune_heads too, or leave width_slack at 0"
            )
        if not isinstance(self.compress_embeddings, bool):
            raise ConfigError(f"compress_embeddings must be True or False; got {self.compress_embeddings!r}")
        if self.method == "union" and self.compress_embeddings:
            raise ConfigError("method='union' does not compress embedding tables; use method='tunecomp' with compress_embeddings")
        if not self.damping > 0:
            raise ConfigError(f"damping must be > 0; got {self.damping}")

    @property
    def prunes_widths(self) -> bool:
        return self.prune_neurons > 0 or self.prune_heads > 0

    @property
    def kept_fraction(self) -> float:
        return 1.0 - float(self.ratio)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        reject_unknown_keys(cls, data, "configuration keys")
        values = dict(data)
        if "exclude" in values:
            values["exclude"] = tuple(values["exclude"])
        return cls(**values)


def reject_unknown_keys(cls: type, data: Iterable[str], what: str) -> None:
    """ConfigError naming the keys of `data` that are not fields of the dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; known {what} are {sorted(known)}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
