"""moelab: when experts don't fit, stream them over the host link or send tokens to them?

Subpackages (import each explicitly; nothing heavy is imported here, so the CLI starts fast):
- moelab.costmodel: specs, presets, HF config loading, closed form, JAX reference, timeline
- moelab.kernels: Triton data-movement kernels with plain references
- moelab.experiments: experiments, report and the CLI
"""

__version__ = "0.1.0"
