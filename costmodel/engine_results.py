"""The result files that inference engines' own benchmarks write, read into runs.

A run is one measured figure and what moelab needs to predict it: the passes the engine ran
(prefill or decode, tokens or batch, context) and how often, the model and the GPUs where
the file names them. What a file lacks comes from the caller (`moelab fit`'s flags). The
key lists, and the engine function that writes each, are in docs/fit.md.

Formats: vLLM `vllm bench serve --save-result` (one JSON object; `--append-result` appends
more, one a line) and `vllm bench throughput --output-json`; SGLang `bench_serving
--output-file` (JSON lines, an unlimited request rate written as bare `Infinity`);
llama.cpp `llama-bench -o json` (a list) and `-o jsonl`; TensorRT-LLM `trtllm-bench
throughput --report_json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moelab.costmodel.jsonfile import read_json_or_lines
from moelab.costmodel.specs import SpecError

# Limits, checked before anything is predicted: far above any real benchmark, low enough
# that the planner's per-pass arrays stay small and a file cannot ask for hours of work.
MAX_TOKENS = 2**24   # tokens in one pass, sequences in a decode batch, context per sequence
MAX_GPUS = 4096
MAX_RUNS = 1000      # runs over all files of one `moelab fit`


@dataclass(frozen=True)
class Pass:
    """`count` forward passes of one shape: a decode step of `n` sequences, or a prefill of
    `n` tokens (whole prompts of `context` tokens, or one chunk of a longer one)."""
    count: float
    decode: bool
    n: int
    context: int

    def check(self, path, label) -> None:
        for what, v in (("batch" if self.decode else "tokens per pass", self.n), ("context", self.context)):
            if not 1 <= v <= MAX_TOKENS:
                raise SpecError(f"result file: {path} {label}: {what} {v:,} is outside 1..{MAX_TOKENS:,}")


@dataclass
class Run:
    file: str
    label: str               # which record of the file and which figure, e.g. "#1 decode"
    engine: str              # vllm | sglang | llama.cpp | trtllm (costmodel/predict's names)
    measured_s: float        # the time `passes` took, as the file gives it
    what: str                # how it was read, e.g. "mean TPOT 12.5 ms at concurrency 8"
    passes: list[Pass]
    strategy: str | None = None  # the planner's strategy of the engine's deployment (None: unrecorded)
    why: str = ""            # where `strategy` came from (printed)
    chosen: bool = False     # strategy settled against the hardware (costmodel/fit.py)
    model: str | None = None  # the file's model id (resolved to a preset or config later)
    gpus: int | None = None
    cpu_moe_layers: int = 0  # llama.cpp's n_cpu_moe: the first layers' experts on the CPU
    expert_dtype: str | None = None  # the weights' storage, where the file says (llama-bench)
    notes: list[str] = field(default_factory=list)
    skip: str | None = None  # why this run cannot be predicted (printed, not fitted)


def serving_strategy(tp, ep, enable_ep=None) -> tuple[str | None, str]:
    """The planner's strategy of a serving engine's recorded parallelism: experts
    tensor-parallel over the TP group unless expert parallelism spans it (the engines' default
    without EP: SGLang ep_size 1, vLLM without --enable-expert-parallel, TensorRT-LLM
    moe_ep_size 1); (None, why) when the record does not say or the split is one moelab does
    not model (EP over part of the TP group)."""
    def size(v):
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None
    tp, ep = size(tp), size(ep)
    if tp is None:
        return None, "the file records no tensor-parallel size"
    if tp == 1 and ep in (None, 1):
        return "ep", "one GPU: tp and ep are the same (no communication)"
    if enable_ep is True or ep == tp:
        return "ep", f"expert parallel over the TP group (tp_size {tp}, ep_size {ep or tp})"
    if ep in (None, 1) and enable_ep is not True:
        return "tp", f"tp_size {tp} without expert parallelism: experts tensor-parallel (engine default)"
    return None, f"ep_size {ep} with tp_size {tp} (EP over part of the TP group) is not modelled"


def read_runs(path: str, *, batch: int | None = None, input_len: int | None = None,
              output_len: int | None = None) -> list[Run]:
    """The runs in one result file; `batch`, `input_len` and `output_len` stand in for what
    the file does not record (a vLLM throughput file has none of them)."""
    records = read_json_or_lines(path, "result file")
    if not records or not all(isinstance(r, dict) for r in records):
        raise SpecError(f"result file: {path} holds no JSON objects (an engine's benchmark result?)")
    kind = _kind(records[0])
    if kind is None:
        raise SpecError(f"result file: {path} is no format moelab fit reads (vLLM bench serve or "
                        "throughput, SGLang bench_serving, llama-bench -o json/jsonl, trtllm-bench "
                        "--report_json): its keys are " + ", ".join(sorted(records[0])[:8]))
    if any(_kind(r) != kind for r in records):
        raise SpecError(f"result file: {path} mixes records of different formats")
    reader = {"vllm-serve": _serving, "sglang": _serving, "vllm-throughput": _vllm_throughput,
              "llama-bench": _llama_bench, "trtllm": _trtllm}[kind]
    if len(records) > MAX_RUNS:
        raise SpecError(f"result file: {path} holds {len(records):,} results; the limit is {MAX_RUNS:,}")
    runs: list[Run] = []
    for i, rec in enumerate(records, 1):
        runs += reader(path, f"#{i}", rec, kind=kind, batch=batch, input_len=input_len,
                       output_len=output_len)
    for r in runs:
        for p in r.passes:
            p.check(path, r.label)
        if r.gpus is not None and not 1 <= r.gpus <= MAX_GPUS:
            raise SpecError(f"result file: {path} {r.label}: {r.gpus:,} GPUs is outside 1..{MAX_GPUS:,}")
    if not runs:
        raise SpecError(f"result file: {path} holds no runs")
    return runs


def _kind(rec: dict) -> str | None:
    if "world_info" in rec and "performance" in rec:
        return "trtllm"
    if "avg_ts" in rec and "n_prompt" in rec:
        return "llama-bench"
    if "elapsed_time" in rec and "num_requests" in rec:
        return "vllm-throughput"
    if "model_id" in rec and "total_output_tokens" in rec:
        return "vllm-serve"
    if "server_info" in rec and "total_output_tokens" in rec:
        return "sglang"
    return None


def _num(path, label, rec: dict, key: str, *, positive=False, allow_none=False) -> float:
    """rec[key] as a finite float (SpecError naming the file, record and key otherwise)."""
    value = rec.get(key) if isinstance(rec, dict) else None
    if value is None and allow_none:
        return None
    if key not in rec:
        raise SpecError(f"result file: {path} {label}: no {key!r}")
    try:
        x = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # a JSON integer past 1e308
        x = math.inf
    if not math.isfinite(x):
        raise SpecError(f"result file: {path} {label}: {key} must be a finite number, got {value!r:.40}")
    if positive and not x > 0:
        raise SpecError(f"result file: {path} {label}: {key} must be > 0, got {value!r}")
    return x


def _int(path, label, rec: dict, key: str, *, default=None) -> int:
    """rec[key] as a whole number >= 0 (`default` where the key is absent or null)."""
    value = rec.get(key)
    if value is None and default is not None:
        return default
    v = _num(path, label, rec, key)
    if v != int(v) or v < 0:
        raise SpecError(f"result file: {path} {label}: {key} must be a whole number >= 0, got {v!r}")
    return int(v)


def _model_id(path, label, value) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise SpecError(f"result file: {path} {label}: the model id must be a string, got {value!r}")


def _serving(path, label, rec, *, kind, batch, **_) -> list[Run]:
    """vLLM `bench serve` and SGLang `bench_serving`: mean TPOT is one decode step of the
    concurrent sequences; with one sequence at a time, mean TTFT is one prompt's prefill."""
    engine = "vllm" if kind == "vllm-serve" else "sglang"
    strategy, why = None, "the file records no parallelism"  # vLLM's result has none
    completed = _num(path, label, rec, "completed", positive=True)
    mean_in = _num(path, label, rec, "total_input_tokens", positive=True) / completed
    mean_out = _num(path, label, rec, "total_output_tokens", positive=True) / completed
    tpot = _num(path, label, rec, "mean_tpot_ms", positive=True) / 1e3
    ttft = _num(path, label, rec, "mean_ttft_ms", allow_none=True)
    rate = rec.get("request_rate")
    unlimited = rate == "inf" or (isinstance(rate, float) and math.isinf(rate))
    conc = rec.get("max_concurrency")
    if batch is not None:
        b, how = batch, "--batch"
    elif isinstance(conc, int) and not isinstance(conc, bool) and conc >= 1:
        b, how = conc, "max_concurrency"
    elif unlimited:
        b, how = int(completed), "all requests at once (unlimited request rate)"
    else:
        raise SpecError(f"result file: {path} {label}: no max_concurrency and a limited request rate "
                        f"({rate!r}): the batch is unknown, give --batch")
    b = max(1, min(int(b), int(completed)))
    model, gpus, notes = _model_id(path, label, rec.get("model_id")), None, []
    if how.startswith("all requests"):
        notes.append("the engine may cap its decode batch below the requests sent (vLLM --max-num-seqs, "
                     "SGLang --max-running-requests): give --batch if so")
    if engine == "sglang":
        info = rec.get("server_info")
        if isinstance(info, dict):
            model = _model_id(path, label, info.get("model_path"))
            tp, ep, dp = (info.get(k) for k in ("tp_size", "ep_size", "dp_size"))
            if isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1:
                gpus = tp  # SGLang's DP attention and EP run inside the TP group's GPUs
                notes.append(f"server_info: tp {tp}, ep {ep}, dp {dp}")
            strategy, why = serving_strategy(tp, ep)
    ctx = round(mean_in + mean_out / 2)  # a decode step's mean context over the output
    runs = [Run(path, f"{label} decode", engine, tpot,
                f"mean TPOT {tpot * 1e3:.4g} ms, batch {b} ({how}), context {ctx}",
                [Pass(1, True, b, ctx)], model=model, gpus=gpus, notes=notes, strategy=strategy, why=why)]
    if ttft is not None and ttft > 0 and b == 1:
        n = round(mean_in)
        runs.append(Run(path, f"{label} prefill", engine, ttft / 1e3,
                        f"mean TTFT {ttft:.4g} ms, one prompt of {n} tokens",
                        [Pass(1, False, n, n)], model=model, gpus=gpus, notes=list(notes),
                        strategy=strategy, why=why))
    return runs


def _waves(path, label, engine, model, gpus, elapsed, n_req, b, n_in, n_out, what) -> Run:
    """A whole offline run: ceil(N / B) waves, each a prefill of B prompts and n_out decode
    steps of B sequences (the engine's continuous batching smooths the waves; the total is
    the same when every request has the same lengths)."""
    b = max(1, min(b, n_req))
    waves = math.ceil(n_req / b)
    passes = [Pass(waves, False, b * n_in, n_in), Pass(waves * n_out, True, b, round(n_in + n_out / 2))]
    return Run(path, f"{label} throughput", engine, elapsed, what, passes, model=model, gpus=gpus,
               why="the file records no parallelism")


def _vllm_throughput(path, label, rec, *, batch, input_len, output_len, **_) -> list[Run]:
    elapsed = _num(path, label, rec, "elapsed_time", positive=True)
    n_req = max(1, _int(path, label, rec, "num_requests"))
    total = _num(path, label, rec, "total_num_tokens", positive=True)
    missing = [f for f, v in (("--input-len", input_len), ("--output-len", output_len), ("--batch", batch))
               if v is None]
    if missing:
        raise SpecError(f"result file: {path} is a vllm bench throughput file, which records no prompt "
                        f"or output length and no batch: give {', '.join(missing)}")
    run = _waves(path, label, "vllm", None, None, elapsed, n_req, batch, input_len, output_len,
                 f"elapsed {elapsed:.4g} s for {n_req} requests of {input_len}+{output_len} tokens, "
                 f"batch {batch} (--batch)")
    if abs(total - n_req * (input_len + output_len)) > 0.05 * total:
        run.notes.append(f"total_num_tokens {total:,} differs from {n_req} x ({input_len}+{output_len})")
    return [run]


def _llama_bench(path, label, rec, **_) -> list[Run]:
    """One llama-bench test: pp (a prompt), tg (generation, batch 1) or pp+tg (-pg), whose
    avg_ts counts prompt and generated tokens together over the whole test."""
    n_p = _int(path, label, rec, "n_prompt")
    n_g = _int(path, label, rec, "n_gen")
    depth = _int(path, label, rec, "n_depth", default=0)
    if n_p + n_g == 0:
        raise SpecError(f"result file: {path} {label}: n_prompt {n_p} and n_gen {n_g} give no test")
    ns = _num(path, label, rec, "avg_ns", allow_none=True)
    if ns is not None and ns > 0:
        t, how = ns / 1e9, f"avg_ns {ns:,.0f}"
    else:
        ts = _num(path, label, rec, "avg_ts", positive=True)
        t, how = (n_p + n_g) / ts, f"({n_p}+{n_g}) / avg_ts {ts:.4g}"
    ngl = _int(path, label, rec, "n_gpu_layers")
    ncmoe = _int(path, label, rec, "n_cpu_moe", default=0)
    if n_p and n_g:
        name, measured = f"pp{n_p}+tg{n_g}", t
        passes = [Pass(1, False, n_p, depth + n_p), Pass(n_g, True, 1, round(depth + n_p + n_g / 2))]
        what = f"test time {t:.4g} s = {how}"
    elif n_p:
        name, measured, passes = f"pp{n_p}", t, [Pass(1, False, n_p, depth + n_p)]
        what = f"prompt time {t:.4g} s = {how}"
    else:
        name, measured = f"tg{n_g}", t / n_g
        passes = [Pass(1, True, 1, round(depth + n_g / 2))]
        what = f"token time {measured * 1e3:.4g} ms = {how} / {n_g}"
    if depth:
        name += f"@d{depth}"
    run = Run(path, f"{label} {name}", "llama.cpp", measured, what, passes, gpus=None,
              strategy="cpu-experts" if ncmoe else "ep", cpu_moe_layers=ncmoe,
              why=f"n_cpu_moe {ncmoe}: " + ("routed experts on the CPU" if ncmoe else "all on the GPU"),
              notes=[f"model_type {rec.get('model_type')!r}, size {rec.get('model_size')}, "
                     f"n_threads {rec.get('n_threads')}, ngl {ngl}, n_cpu_moe {ncmoe}"])
    run.expert_dtype, how = gguf_dtype(rec.get("model_type"), rec.get("model_size"),
                                       rec.get("model_n_params"))
    run.notes.append(f"weights {run.expert_dtype}: {how}" if run.expert_dtype
                     else f"weights: the model's config dtype ({how})")
    if not str(rec.get("gpu_info") or "").strip() or ngl == 0:
        run.skip = "no layer on a GPU (gpu_info empty or n_gpu_layers 0): moelab models no CPU-only run"
    return [run]


# Bits per weight at or under which a GGUF file is predicted as the planner's int4 (Q2..Q5
# k-quants, IQ quants: 2.5..5.5 bits with their scales), else int8 (Q6_K 6.56, Q8_0 8.5), else
# bf16 (F16, BF16: 16). The planner has no 5- or 6-bit storage; these are the nearest.
INT4_MAX_BPW = 6.0
INT8_MAX_BPW = 12.0


def gguf_dtype(model_type: str | None, model_size, n_params) -> tuple[str | None, str]:
    """(planner dtype, how) of a llama-bench model: from bits per weight 8 x model_size /
    model_n_params where both are numbers, else from the quant type named in model_type
    (e.g. "qwen3moe 30B.A3B Q4_K - Medium"); (None, why) when neither says."""
    import re

    def number(v):
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None
    size, params = number(model_size), number(n_params)
    if size and params and math.isfinite(8 * size / params):
        bpw = 8 * size / params
        dtype = "int4" if bpw <= INT4_MAX_BPW else "int8" if bpw <= INT8_MAX_BPW else "bf16"
        return dtype, f"{bpw:.3g} bits per weight (8 x model_size / model_n_params)"
    m = re.search(r"\b(I?Q(\d)|BF16|F16|F32)", model_type or "", re.I)
    if m:
        bits = int(m.group(2)) if m.group(2) else 16
        dtype = "int4" if bits <= 5 else "int8" if bits <= 8 else "bf16"
        return dtype, f"model_type {model_type!r}"
    return None, "neither model_size / model_n_params nor model_type names the quantization"


def _trtllm(path, label, rec, *, batch, **_) -> list[Run]:
    """trtllm-bench: the whole run from output_throughput_per_gpu_tok_s, and with --streaming
    its mean TPOT as one decode step of the mean concurrent requests."""
    world, req, perf = rec.get("world_info"), rec.get("request_info"), rec.get("performance")
    for key, part in (("world_info", world), ("request_info", req), ("performance", perf)):
        if not isinstance(part, dict):
            raise SpecError(f"result file: {path} {label}: {key} must be an object")
    gpus = max(1, _int(path, f"{label} world_info", world, "world_size"))
    n_req = max(1, _int(path, f"{label} request_info", req, "num_requests"))
    n_in = _num(path, f"{label} request_info", req, "avg_input_length", positive=True)
    n_out = _num(path, f"{label} request_info", req, "avg_output_length", positive=True)
    conc = _num(path, f"{label} request_info", req, "avg_num_concurrent_requests", positive=True)
    per_gpu = _num(path, f"{label} performance", perf, "output_throughput_per_gpu_tok_s", positive=True)
    engine_info = rec.get("engine") if isinstance(rec.get("engine"), dict) else {}
    # model_path is str(None) when the run named a model by its HF id only
    model = _model_id(path, label, engine_info.get("model_path"))
    if model in (None, "None"):
        model = _model_id(path, label, engine_info.get("model"))
    b = batch if batch is not None else max(1, round(conc))
    elapsed = n_req * n_out / (per_gpu * gpus)  # the report's definition of the per-GPU figure
    notes = [f"world_info: tp {world.get('tp_size')}, ep {world.get('ep_size')}, pp {world.get('pp_size')}"]
    runs = [_waves(path, label, "trtllm", model, gpus, elapsed, n_req, b, round(n_in), round(n_out),
                   f"{per_gpu:.4g} output tokens/s per GPU x {gpus} GPUs: {elapsed:.4g} s for {n_req} "
                   f"requests of {n_in:.0f}+{n_out:.0f} tokens, batch {b} (mean concurrency)")]
    runs[0].notes += notes
    runs[0].strategy, runs[0].why = serving_strategy(world.get("tp_size"), world.get("ep_size"))
    stream = rec.get("streaming_metrics")
    if isinstance(stream, dict) and stream.get("avg_tpot_ms"):
        tpot = _num(path, f"{label} streaming_metrics", stream, "avg_tpot_ms", positive=True) / 1e3
        ctx = round(n_in + n_out / 2)
        runs.append(Run(path, f"{label} decode", "trtllm", tpot,
                        f"mean TPOT {tpot * 1e3:.4g} ms, batch {b}, context {ctx}",
                        [Pass(1, True, b, ctx)], model=model, gpus=gpus, notes=list(notes),
                        strategy=runs[0].strategy, why=runs[0].why))
    return runs
