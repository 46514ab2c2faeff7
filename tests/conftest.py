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
# Tests compile afresh and write nothing under $HOME (the CLI keeps compiled programs there).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

import pytest  # noqa: E402
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


POISON_INT = -7777  # what every integer a kernel allocates holds until the kernel writes it


@pytest.fixture
def device():
    """cuda under MOELAB_GPU_TESTS=1 on a GPU (ci/gpu-check), else cpu (Triton's interpreter)."""
    import torch

    return "cuda" if os.environ.get("MOELAB_GPU_TESTS") and torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every tensor the dispatch/combine launchers allocate starts as NaN / -7777, so an
    element the kernel should have written but did not fails the comparison."""
    import torch

    from moelab.kernels import dispatch as dispatch_mod

    def poisoned_empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else POISON_INT)

    monkeypatch.setattr(dispatch_mod, "_empty", poisoned_empty)
