"""`ClusterSpec`: the static, per-leaf description of how a weight is clustered."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

INIT_METHODS = ("linear", "random", "density", "kmeans++", "kmeans")
GRANULARITIES = ("tensor", "channel", "group")
AGGREGATIONS = ("mean", "sum")
ASSIGNMENTS = ("hard", "dkm")

InitMethod = Literal["linear", "random", "density", "kmeans++", "kmeans"]
Granularity = Literal["tensor", "channel", "group"]
Aggregation = Literal["mean", "sum"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """How one weight tensor is clustered. Frozen, hashable and static under `jax.jit`.

    Attributes:
      num_clusters: K, the number of centroids per table (an `int >= 1`, `>= 2` with
        `preserve_sparsity`).
      init: centroid initialization, one of `"linear"` (evenly spaced over [min, max]),
        `"random"` (uniform in [min, max]), `"density"` (quantiles of the empirical CDF
        at `(i + 0.5) / K`), `"kmeans++"` (greedy D^2 seeding, `2 + ln K` candidates per
        centre) or `"kmeans"` (the default: the 1-D k-means optimum, exact for tables of
        up to ~100-2000 values and within a bin-resolution bound above that; see
        BUILD.md).
      granularity: `"tensor"` (one table for the whole leaf), `"channel"` (one table per
        index along `channel_axis`) or `"group"` (one table per `group_size` consecutive
        channels along `channel_axis`).
      channel_axis: the channel axis for `"channel"` / `"group"`. Flax kernels are laid
        out `(..., in, out)`, so the default `-1` means output channels.
      group_size: channels per table for `granularity="group"`; must divide the size of
        `channel_axis`.
      preserve_sparsity: keep the weights that are exactly zero at `init` exactly zero
        through training. Reserves centroid 0 of every table as a fixed zero centroid.
      gradient_aggregation: `"mean"` divides each centroid's gradient by its cluster size
        in `clusterjax.optimizer`; `"sum"` keeps the plain (segment-sum) gradient.
      update_indices: re-assign weights to their nearest centroid after every optimizer
        step (differentiable training). `False` freezes the indices found at `init`.
      outliers: the fraction of the leaf's weights kept exactly, outside the tables, as a
        sparse part ("dense-and-sparse", SqueezeLLM): a float in `[0, 1)`, default `0.0`.
        `init` picks `round(outliers * size)` of them per leaf: the largest
        `importance * w**2` when `importance` is given, else the largest `|w|`. They are
        left out of the k-means, keep their own value (rounded to float16, as the packed
        file stores them) and get their plain gradient in training.
      assignment: `"hard"` (the default: nearest centroid, straight-through gradient) or
        `"dkm"` (differentiable k-means, Cho et al. 2022): `apply` softly assigns every
        weight to the centroids, `A = softmax(-(w - c)**2 / temperature)`, re-estimates
        the centroids as attention-weighted means `dkm_iters` times from the state's
        centroids, and returns `A @ c`, so gradients reach the weights through the
        clustering itself. The state's centroids are a warm start, refreshed (with the
        hard indices) by `update_indices`; they get zero gradient and `cj.optimizer`
        leaves them alone. `strip`, `pack` and `summary` use the hard assignment.
        Exact (no approximation) and without N x K memory: see `clusterjax/_src/dkm.py`.
      temperature: DKM's tau, in squared weight units (a float > 0), or `None` (the
        default) for `0.5 * (median gap between adjacent sorted centroids)**2` per
        table, recomputed from the warm start at every step. Only with
        `assignment="dkm"`.
      dkm_iters: centroid re-estimations per DKM forward pass (an int >= 1, default 3).

    Example:
      >>> import clusterjax as cj
      >>> spec = cj.ClusterSpec(num_clusters=16, init="kmeans++", granularity="channel")
      >>> spec.bits
      4
    """

    num_clusters: int
    init: InitMethod = "kmeans"
    granularity: Granularity = "tensor"
    channel_axis: int = -1
    group_size: int | None = None
    preserve_sparsity: bool = False
    gradient_aggregation: Aggregation = "mean"
    update_indices: bool = True
    outliers: float = 0.0
    assignment: Literal["hard", "dkm"] = "hard"
    temperature: float | None = None
    dkm_iters: int = 3

    def __post_init__(self):
        k = self.num_clusters
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise ValueError(
                f"ClusterSpec(num_clusters={k!r}): num_clusters must be an int, got "
                f"{type(k).__name__}. Fix: ClusterSpec(num_clusters=16)."
            )
        object.__setattr__(self, "num_clusters", int(k))
        minimum = 2 if self.preserve_sparsity else 1
        if k < minimum:
            why = (
                " with preserve_sparsity=True (centroid 0 is the fixed zero)"
                if minimum == 2
                else ""
            )
            raise ValueError(
                f"ClusterSpec(num_clusters={k}): num_clusters must be >= {minimum}{why}."
            )
        if k > 2**31 - 1:
            raise ValueError(f"ClusterSpec(num_clusters={k}): num_clusters is too large.")
        _check_choice("init", self.init, INIT_METHODS)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("gradient_aggregation", self.gradient_aggregation, AGGREGATIONS)
        if isinstance(self.channel_axis, bool) or not isinstance(
            self.channel_axis, (int, np.integer)
        ):
            raise ValueError(
                f"ClusterSpec(channel_axis={self.channel_axis!r}): channel_axis must be an int."
            )
        object.__setattr__(self, "channel_axis", int(self.channel_axis))
        if self.granularity == "group":
            g = self.group_size
            if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
                raise ValueError(
                    f"ClusterSpec(granularity='group', group_size={g!r}): group needs an "
                    "int group_size >= 1. Fix: ClusterSpec(num_clusters=16, "
                    "granularity='group', group_size=8)."
                )
            object.__setattr__(self, "group_size", int(g))
        elif self.group_size is not None:
            raise ValueError(
                f"ClusterSpec(group_size={self.group_size!r}) is only used with "
                f"granularity='group', but granularity={self.granularity!r}."
            )
        for name in ("preserve_sparsity", "update_indices"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(
                    f"ClusterSpec({name}={getattr(self, name)!r}): {name} must be a bool."
                )
            object.__setattr__(self, name, bool(getattr(self, name)))
        f = self.outliers
        if (
            isinstance(f, (bool, np.bool_))
            or not isinstance(f, (int, float, np.integer, np.floating))
            or not 0.0 <= float(f) < 1.0
        ):
            raise ValueError(
                f"ClusterSpec(outliers={f!r}): outliers is the fraction of each leaf's "
                "weights kept exactly (a float in [0, 1)). Fix: e.g. "
                "ClusterSpec(num_clusters=16, outliers=0.005) for 0.5%."
            )
        object.__setattr__(self, "outliers", float(f))
        self._check_dkm()

    def _check_dkm(self) -> None:
        _check_choice("assignment", self.assignment, ASSIGNMENTS)
        t = self.temperature
        if t is not None:
            if (
                isinstance(t, (bool, np.bool_))
                or not isinstance(t, (int, float, np.integer, np.floating))
                or not np.isfinite(t)
                or t <= 0
            ):
                raise ValueError(
                    f"ClusterSpec(temperature={t!r}): the DKM temperature must be a finite "
                    "float > 0 (squared weight units), or None to derive it from each "
                    "table's centroid spacing. Fix: temperature=None."
                )
            if self.assignment != "dkm":
                raise ValueError(
                    f"ClusterSpec(temperature={t!r}) only applies to assignment='dkm', but "
                    f"assignment={self.assignment!r}. Fix: ClusterSpec(..., "
                    "assignment='dkm', temperature=...) or drop temperature."
                )
            object.__setattr__(self, "temperature", float(t))
        it = self.dkm_iters
        if isinstance(it, (bool, np.bool_)) or not isinstance(it, (int, np.integer)) or it < 1:
            raise ValueError(
                f"ClusterSpec(dkm_iters={it!r}): dkm_iters must be an int >= 1 (centroid "
                "re-estimations per forward pass). Fix: e.g. dkm_iters=3."
            )
        object.__setattr__(self, "dkm_iters", int(it))
        if self.assignment == "dkm" and not self.update_indices:
            raise ValueError(
                "ClusterSpec(assignment='dkm', update_indices=False): DKM re-assigns every "
                "weight softly at every step, so its indices cannot be frozen. Fix: "
                "assignment='hard' for frozen indices, or update_indices=True."
            )

    @property
    def bits(self) -> int:
        """Bits needed per index: `ceil(log2(K))`, at least 1."""
        return index_bits(self.num_clusters)

    @property
    def index_dtype(self) -> np.dtype:
        """The smallest unsigned integer dtype that holds indices `0 .. K-1`."""
        return index_dtype(self.num_clusters)


def _check_choice(field: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"ClusterSpec({field}={value!r}): unknown {field}; allowed values are "
            + ", ".join(repr(a) for a in allowed)
            + "."
        )


def index_bits(num_clusters: int) -> int:
    """`ceil(log2(K))`, at least 1: the bits a packed index takes."""
    return max(1, int(num_clusters - 1).bit_length())


def index_dtype(num_clusters: int) -> np.dtype:
    """Smallest unsigned integer dtype holding `0 .. num_clusters - 1`."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_clusters - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"num_clusters={num_clusters} does not fit in uint32 indices.")
