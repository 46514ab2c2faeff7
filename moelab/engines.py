"""Launch flags that realise a plan's recommended strategy in an inference engine.

Every flag name is taken from the engine's own documentation; docs/engines.md cites each.
Where an engine cannot express a strategy, `launch_flags` says so instead of guessing.
"""

from __future__ import annotations

ENGINES = ("vllm", "sglang", "llama.cpp")


def launch_flags(report: dict, engine: str, strategy: str | None = None) -> tuple[list[str], str]:
    """(flags, note) for `strategy` (default: the report's best) in `engine`; flags empty when
    the engine cannot express it (the note says why)."""
    from moelab.costmodel.specs import SpecError

    if engine not in ENGINES:
        raise SpecError(f"emit: unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    name = strategy or report.get("best")
    if name is None:
        return [], "no strategy fits: nothing to launch"
    s = next(x for x in report["strategies"] if x["name"] == name)
    gpus = s["gpus"]
    util = report["system"].get("hbm_utilization", 0.9)
    ctx = report["workload"]["context"]
    kv = "fp8" if report.get("kv_dtype") == "fp8" else None
    if engine == "vllm":
        if name == "ep":
            dp = s.get("attention", "").startswith("data")
            flags = ["--enable-expert-parallel"]
            flags += ([f"--data-parallel-size {gpus}", "--tensor-parallel-size 1"] if dp
                      else [f"--tensor-parallel-size {gpus}"])
            flags += [f"--gpu-memory-utilization {util:g}", f"--max-model-len {ctx}"]
            flags += [f"--kv-cache-dtype {kv}"] if kv else []
            return flags, ("vLLM: EP over the data-parallel (or tensor-parallel) group; for "
                           "multi-node decode add --all2all-backend deepep_low_latency")
        if name == "offload":
            gb = s["memory"]["host_node"]["experts"] / 1e9
            return ([f"--cpu-offload-gb {gb:.0f}", f"--gpu-memory-utilization {util:g}",
                     f"--max-model-len {ctx}"],
                    "vLLM offloads whole weights to CPU memory and streams them each pass; it has "
                    "no resident hot-expert cache, so expect the no-cache (hit rate 0) figure")
        return [], f"vLLM cannot run routed experts on the CPU ({name}): use llama.cpp or KTransformers"
    if engine == "sglang":
        if name == "ep":
            dp = s.get("attention", "").startswith("data")
            flags = [f"--tp-size {gpus}", f"--ep-size {gpus}"]
            if dp:
                flags += [f"--dp-size {gpus}", "--enable-dp-attention"]
            flags += ["--moe-a2a-backend deepep", f"--mem-fraction-static {util:g}"]
            return flags, "SGLang: DeepEP all-to-all; data-parallel attention when the plan chose it"
        return [], (f"SGLang's documented server arguments we read have no flag for {name}; "
                    "its CPU-expert path runs through KTransformers")
    # llama.cpp
    if name in ("cpu-experts", "hybrid"):
        L = report["model_layers"]
        moe_layers = report["model_moe_layers"]
        r = s.get("gpu_experts_per_layer", 0)
        flags = ["--n-gpu-layers 999", f"--ctx-size {ctx}"]
        if name == "cpu-experts" or r == 0:
            flags.insert(1, "--cpu-moe")
            note = "all routed experts in host RAM, attention and shared experts on the GPU"
        else:
            # llama.cpp places experts per layer, not per expert: keep whole layers on the GPU
            # holding about as many expert bytes as the plan's r hottest experts per layer.
            gpu_layers = round(moe_layers * r / report["model_experts"])
            flags.insert(1, f"--n-cpu-moe {L - gpu_layers}")
            note = (f"llama.cpp splits by layer, not by expert: {gpu_layers} layers' experts on the "
                    f"GPU hold about the bytes of the plan's {r} hottest experts per layer")
        return flags, note
    return [], (f"llama.cpp has no expert parallelism across GPUs and no per-pass expert streaming "
                f"({name})")
