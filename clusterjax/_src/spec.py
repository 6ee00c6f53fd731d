"""`ClusterSpec`: the static, per-leaf description of how a weight is clustered."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

INIT_METHODS = ("linear", "random", "density", "kmeans++", "kmeans")
GRANULARITIES = ("tensor", "channel", "group")
AGGREGATIONS = ("mean", "sum")
LUT_DTYPES = (None, "int8", "uint8")
#: Init methods that work on d-dimensional vectors (`cluster_dim > 1`).
VECTOR_INIT_METHODS = ("random", "kmeans++", "kmeans")
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
      cluster_dim: d, the length of the vectors a table holds (vector palettization,
        coremltools' `cluster_dim`). With `d > 1`, every d consecutive weights along
        `vector_axis` form one vector, a table holds K vectors of d, and each vector gets
        one index: `ceil(log2 K) / d` index bits per weight. Init by `"kmeans"` (the
        default: k-means++ seeding and Lloyd iterations in d dimensions), `"kmeans++"` or
        `"random"`; assignment is the nearest vector in Euclidean distance. The leaf's
        size along `vector_axis` must be divisible by d.
      vector_axis: the axis along which the d weights of a vector are consecutive (only
        read when `cluster_dim > 1`). Flax kernels are laid out `(..., in, out)`, so the
        default `-2` is the input axis (coremltools groups input channels the same way).
        It must differ from `channel_axis` for "channel" / "group" tables.
      lut_dtype: `None` (float tables), `"int8"` or `"uint8"`: the table is stored
        quantized, one scale per table (symmetric `max|c| / 127` for int8; affine
        `(max - min) / 255` with an integer zero point for uint8). In training the
        centroids are fake-quantized in the forward pass with a straight-through gradient
        (cluster-preserving QAT), so `clusterjax.strip` gives exactly the values the
        packed file reconstructs.
      per_channel_scale: divide every channel (along `channel_axis`, by default the output
        channels of a Flax kernel) by its own scale, the root mean square of the channel
        rounded to float16, before the table(s) are fitted; the weight is `scale[c] * table[index]`.
        The scales are fixed at `init` (they live in `ClusterState.scales`) and stored as
        float16.
      assignment: `"hard"` (the default: nearest centroid, straight-through gradient) or
        `"dkm"` (differentiable k-means, Cho et al. 2022): `apply` softly assigns every
        weight to the centroids, `A = softmax(-(w - c)**2 / temperature)`, re-estimates
        the centroids as attention-weighted means `dkm_iters` times from the state's
        centroids, and returns `A @ c`, so gradients reach the weights through the
        clustering itself. The state's centroids are a warm start, refreshed (with the
        hard indices) by `update_indices`; they get zero gradient and `cj.optimizer`
        leaves them alone. `strip`, `pack` and `summary` use the hard assignment.
        Never holds an N x K map: tables of many weights interpolate the map from a
        grid of nodes when its measured error allows (gradients within 1e-4 of the exact
        ones), and everything else is exact; see `clusterjax/_src/dkm.py`.
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
    cluster_dim: int = 1
    vector_axis: int = -2
    lut_dtype: Literal["int8", "uint8"] | None = None
    per_channel_scale: bool = False
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
        self._check_formats()
        self._check_dkm()

    def _check_formats(self) -> None:
        d = self.cluster_dim
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 1:
            raise ValueError(
                f"ClusterSpec(cluster_dim={d!r}): cluster_dim must be an int >= 1 (the "
                "number of weights per table entry). Fix: e.g. cluster_dim=2."
            )
        object.__setattr__(self, "cluster_dim", int(d))
        a = self.vector_axis
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
            raise ValueError(f"ClusterSpec(vector_axis={a!r}): vector_axis must be an int.")
        object.__setattr__(self, "vector_axis", int(a))
        _check_choice("lut_dtype", self.lut_dtype, LUT_DTYPES)
        if not isinstance(self.per_channel_scale, (bool, np.bool_)):
            raise ValueError(
                f"ClusterSpec(per_channel_scale={self.per_channel_scale!r}): "
                "per_channel_scale must be a bool."
            )
        object.__setattr__(self, "per_channel_scale", bool(self.per_channel_scale))
        if d > 1:
            if self.init not in VECTOR_INIT_METHODS:
                raise ValueError(
                    f"ClusterSpec(init={self.init!r}, cluster_dim={d}): {self.init!r} is a "
                    "scalar-only init; vector tables are initialized by "
                    + ", ".join(repr(m) for m in VECTOR_INIT_METHODS)
                    + ". Fix: init='kmeans'."
                )
            if self.preserve_sparsity:
                raise ValueError(
                    f"ClusterSpec(preserve_sparsity=True, cluster_dim={d}): a fixed zero "
                    "centroid is scalar-only. Fix: cluster_dim=1, or preserve_sparsity=False."
                )
            if self.outliers:
                raise ValueError(
                    f"ClusterSpec(outliers={self.outliers}, cluster_dim={d}): outliers are "
                    "single weights, so they need cluster_dim=1. Fix: outliers=0.0."
                )
        if self.outliers and self.per_channel_scale:
            raise ValueError(
                f"ClusterSpec(outliers={self.outliers}, per_channel_scale=True): the two "
                "cannot be combined (the scales would be set by the outliers). Fix: "
                "outliers=0.0 or per_channel_scale=False."
            )

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
        formats = self.cluster_dim > 1 or self.lut_dtype is not None or self.per_channel_scale
        if self.assignment == "dkm" and formats:
            raise ValueError(
                f"ClusterSpec(assignment='dkm', cluster_dim={self.cluster_dim}, "
                f"lut_dtype={self.lut_dtype!r}, per_channel_scale={self.per_channel_scale}): "
                "the soft map is built for plain scalar tables. Fix: assignment='hard' for "
                "vector, int8/uint8 or per-channel-scaled tables, or drop those options."
            )
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
