"""Test configuration: strict rank promotion, deterministic hypothesis profile."""

import os

# The tests run small arrays, so their time is XLA compilation: LLVM's optimization passes
# off (the same semantics, unoptimized machine code) compile them much faster.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "clusterjax",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("clusterjax")
