"""The gamma cost model: specs, presets, HF config loading, closed form, JAX reference, timeline."""
