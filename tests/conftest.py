"""Test set-up that must happen before jax or triton are imported anywhere.

- Triton runs on the CPU only in its interpreter, which must be switched on before
  any @triton.jit decorator runs.
- JAX gets 8 simulated CPU devices so that expert parallelism runs for real.
"""

import os

# MOELAB_GPU_TESTS=1 (ci/gpu-check) runs the same tests compiled on a real GPU.
if not os.environ.get("MOELAB_GPU_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from hypothesis import HealthCheck, settings  # noqa: E402

# CI: deterministic (derandomized) and bounded; dev: the default random exploration.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
