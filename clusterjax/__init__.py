"""clusterjax: weight clustering (weight sharing, palettization) for JAX and Flax."""

from clusterjax._src.spec import ClusterSpec as ClusterSpec
from clusterjax._src.straight_through import straight_through as straight_through

__version__ = "0.1.0"
