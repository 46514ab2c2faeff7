"""Launch flags that realise a plan's recommended strategy in an inference engine.

Every flag name is taken from the engine's own documentation; docs/engines.md cites each.
Where an engine cannot express a strategy, `launch_flags` says so instead of guessing.
"""

from __future__ import annotations

import math

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
            flags += [f"--data-parallel-size {gpus}"] if dp else [f"--tensor-parallel-size {gpus}"]
            flags += [f"--gpu-memory-utilization {util:g}", f"--max-model-len {ctx}"]
            flags += [f"--kv-cache-dtype {kv}"] if kv else []
            note = ("vLLM: EP over the data-parallel (or tensor-parallel) group; for "
                    "multi-node decode add --all2all-backend deepep_low_latency")
            if s.get("micro_batches") == 2:
                # vLLM's dual batch overlap needs DP > 1 with EP (docs/design/dbo.md)
                if dp and gpus > 1:
                    flags.append("--enable-dbo")
                    note += "; --enable-dbo: dual batch overlap (needs a DeepEP all2all backend)"
                else:
                    note += ("; the plan's two-batch overlap is not emitted: vLLM's --enable-dbo "
                             "needs data-parallel attention over more than one GPU")
            return flags, note
        if name == "offload":
            gpu = s["memory"]["gpu_each"]
            resident = gpu["available"] - gpu["non_expert"] - gpu["kv"] - gpu["staging"]
            gib = max(0.0, report["weights_bytes"] - gpu["non_expert"] - resident) / 2**30
            return ([f"--cpu-offload-gb {math.ceil(gib)}", f"--gpu-memory-utilization {util:g}",
                     f"--max-model-len {ctx}"],
                    "vLLM keeps the offloaded GiB of weights in CPU memory and reads them every "
                    "pass (UVA); which weights it offloads is its choice, not the plan's hottest "
                    "experts, so expect the no-cache figure; one engine per GPU")
        if name == "tp":
            # Without --enable-expert-parallel the expert layers form one TP group of DP x TP
            # GPUs (docs.vllm.ai serving/data_parallel_deployment).
            dp = s.get("attention", "").startswith("data")
            flags = [f"--data-parallel-size {gpus}"] if dp else [f"--tensor-parallel-size {gpus}"]
            flags += [f"--gpu-memory-utilization {util:g}", f"--max-model-len {ctx}"]
            flags += [f"--kv-cache-dtype {kv}"] if kv else []
            return flags, "vLLM: experts tensor-parallel over all GPUs (no expert parallelism)"
        return [], f"vLLM cannot run routed experts on the CPU ({name}): use llama.cpp or KTransformers"
    if engine == "sglang":
        if name == "ep":
            dp = s.get("attention", "").startswith("data")
            flags = [f"--tp-size {gpus}", f"--ep-size {gpus}"]
            if dp:
                flags += [f"--dp-size {gpus}", "--enable-dp-attention"]
            flags += ["--moe-a2a-backend deepep", f"--mem-fraction-static {util:g}"]
            if s.get("micro_batches") == 2:  # the plan's two-batch overlap (--micro-batches 2)
                flags.append("--enable-two-batch-overlap")
            return flags, "SGLang: DeepEP all-to-all; data-parallel attention when the plan chose it"
        if name == "tp":
            flags = [f"--tp-size {gpus}"]
            if s.get("attention", "").startswith("data"):
                flags += [f"--dp-size {gpus}", "--enable-dp-attention"]
            flags += [f"--mem-fraction-static {util:g}"]
            return flags, "SGLang: experts tensor-parallel (no --ep-size)"
        return [], (f"SGLang's documented server arguments we read have no flag for {name}; "
                    "its CPU-expert path runs through KTransformers")
    # llama.cpp
    if name in ("cpu-experts", "hybrid"):
        L = report["model_layers"]
        moe_layers = report["model_moe_layers"]
        r = s.get("gpu_experts_per_layer", 0)
        flags = ["--n-gpu-layers all", f"--ctx-size {ctx}"]
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
    if name == "offload":
        cache = s["memory"]["gpu_each"].get("expert_cache", 0) / 2**20
        return (["--n-gpu-layers all", "--cpu-moe", f"--moe-cache-mib {math.floor(cache)}",
                 f"--ctx-size {ctx}"],
                "experts kept in host RAM with a GPU cache of them; llama.cpp copies host weights "
                "to the GPU for large batches (--op-offload, on by default) and may compute small "
                "batches on the CPU instead")
    return [], f"llama.cpp has no expert parallelism across GPUs ({name}): use vLLM or SGLang"
