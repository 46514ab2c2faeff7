"""Triton kernels for MoE data movement, each public op beside its plain reference."""
