"""clusterjax: weight clustering (weight sharing, palettization) for JAX and Flax.

Pure functions over pytrees: `init` builds a `ClusterState` (centroids, indices, masks)
for selected leaves of a params pytree, `apply` maps params to clustered params with a
straight-through gradient, `optimizer` wraps an optax transform for clustered training,
`update_indices` re-assigns weights to their nearest centroids, and `strip` returns plain
dense params. See README.md for the train step. Other straight-through quantizers (XNOR
binarization, uniform fake quantization) live in `clusterjax.quantizers`.
"""

from clusterjax import quantizers as quantizers
from clusterjax._src.adapters import nnx_merge as nnx_merge
from clusterjax._src.adapters import wrap_apply as wrap_apply
from clusterjax._src.core import apply as apply
from clusterjax._src.core import init as init
from clusterjax._src.core import strip as strip
from clusterjax._src.core import update_indices as update_indices
from clusterjax._src.fileformat import FormatError as FormatError
from clusterjax._src.fileformat import load as load
from clusterjax._src.fileformat import save as save
from clusterjax._src.importance import fisher_importance as fisher_importance
from clusterjax._src.optimizer import ClusterOptimizerState as ClusterOptimizerState
from clusterjax._src.optimizer import optimizer as optimizer
from clusterjax._src.packing import PackedArray as PackedArray
from clusterjax._src.packing import pack as pack
from clusterjax._src.packing import unpack as unpack
from clusterjax._src.spec import ClusterSpec as ClusterSpec
from clusterjax._src.state import ClusterState as ClusterState
from clusterjax._src.straight_through import straight_through as straight_through
from clusterjax._src.summary import Summary as Summary
from clusterjax._src.summary import summary as summary
from clusterjax._src.tree import path_str as path_str

__version__ = "0.1.0"

__all__ = [
    "ClusterOptimizerState",
    "ClusterSpec",
    "ClusterState",
    "FormatError",
    "PackedArray",
    "Summary",
    "apply",
    "fisher_importance",
    "init",
    "load",
    "nnx_merge",
    "optimizer",
    "pack",
    "quantizers",
    "path_str",
    "save",
    "straight_through",
    "strip",
    "summary",
    "unpack",
    "update_indices",
    "wrap_apply",
]
