"""moelab: when a MoE model's experts don't fit, stream them over the host link or send tokens to them?

The Python API (SI units in and out; `help(moelab.gamma)` for the arguments):

    import moelab
    r = moelab.gamma("deepseek-r1", tokens=4096, b_pcie=64e9, b_net=50e9,
                     expert_dtype="fp8", act_dtype="bf16")
    print(r.gamma)                       # 75.0: > 1, expert parallelism wins
    moelab.load_model("config.json")     # any HF MoE config, or a preset name
    moelab.load_system("h200-sxm", network="roce-100g")

Names load on first use, so `import moelab` (and the CLI) starts without numpy or jax.
Subpackages: moelab.costmodel (specs, presets, closed form, JAX reference), moelab.kernels
(Triton data movement), moelab.experiments (experiments and the report), moelab.commands
(the CLI, one module per command).
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "gamma": "moelab.api",
    "plan": "moelab.api",
    "CpuSpec": "moelab.costmodel.plan",
    "Report": "moelab.api",
    "model_spec": "moelab.api",
    "system_spec": "moelab.api",
    "workload": "moelab.api",
    "load_model": "moelab.costmodel.presets",
    "load_system": "moelab.costmodel.presets",
    "model_names": "moelab.costmodel.presets",
    "system_names": "moelab.costmodel.presets",
    "evaluate": "moelab.costmodel.closed_form",
    "ModelSpec": "moelab.costmodel.specs",
    "SystemSpec": "moelab.costmodel.specs",
    "Workload": "moelab.costmodel.specs",
    "Options": "moelab.costmodel.specs",
    "SpecError": "moelab.costmodel.specs",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
