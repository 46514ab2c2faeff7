"""Derive achieved-efficiency curves from aiconfigurator-core's measured per-operation tables.

    python -m moelab.costmodel.predict.derive_efficiency --wheel PATH.whl \
        --out costmodel/predict/efficiency.json

aiconfigurator-core (NVIDIA, Apache-2.0, PyPI) ships per-GPU, per-framework latency tables
(systems/data/<gpu>/<op>/<framework>/<version>/*.parquet). For each row this script computes
the op's roofline time with moelab's own preset peaks (costmodel/presets/systems.json, the
figures the planner uses) and takes efficiency = roofline / measured, clipped at 1 (clipped
rows are counted). Curves are medians over the rows whose shape falls in log-spaced bins
(breakpoints 4^i, a row at x counts for the breakpoint within a factor 2 of it). Only GPUs
with a moelab preset are derived (the others lack our peaks); per framework the newest
version of each table is used. Without --wheel the pinned wheel is fetched with
`pip download`. pandas and pyarrow are needed here only; the planner reads the JSON.

Classes (x = the shape coordinate):
- gemm[bf16|fp8]: dense GEMM, x = M (tokens); rows with N, K >= 1024 (model layers);
  roofline max(2MNK / peak, (MK + KN) w + 2MN) / HBM), the fastest kernel per shape.
  gemm_nk<b>[bf16|fp8]: the same over the rows whose weight N K is within a factor 2 of 2^b
  (b = 20, 22, ...): at small M the efficiency falls with the weight's size.
- moe[bf16|fp8|int4]: grouped expert GEMM (gated, 3 matrices), balanced routing, x = tokens
  per expert (T k / E); T k rows, min(E, T k) experts read. Only rows without EP or TP
  (ep = tp = 1), whose shape is unambiguous.
- attn_decode[bf16|fp8] (GQA, KV dtype), x = the KV bytes one layer reads (batch x context x
  KV width): those bytes at HBM speed or 4 b h d ctx FLOPs, whichever is slower. mla_decode
  the same with MLA's latent (576 wide).
- attn_prefill[bf16|fp8]: causal prefill, x = batch x prompt: 2 b h d isl^2 FLOPs.
- a2a_ll / a2a_ht: DeepEP low-latency / high-throughput dispatch + combine inside one node,
  x = bytes per rank over NVLink (copies x tokens x hidden x 2 + 2 bytes, as
  closed_form.ep_legs counts them). floor_s: the median over shapes of the smallest time;
  eff = roofline / (measured - floor) (the bandwidth part, clipped at 1).
- allreduce: the framework's custom all-reduce, x = message bytes, roofline
  2 (n-1)/n bytes / B_nvlink, floor and eff as for a2a.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "aiconfigurator-core", "0.12.0"
# aiconfigurator's GPU folder -> moelab's GPU preset (the peaks the roofline uses)
TABLE_GPUS = {"h100_sxm": "h100-sxm", "h200_sxm": "h200-sxm", "b200_sxm": "b200", "gb200": "gb200"}
FRAMEWORKS = ("vllm", "sglang", "trtllm")
MIN_NK = 1024
MLA_WIDTH = 576  # DeepSeek's kv_lora_rank 512 + qk_rope_head_dim 64
GEMM_DTYPES = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8"}
MOE_DTYPES = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8", "int4_wo": "int4", "w4a16_mxfp4": "int4"}
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5}
KV_DTYPES = {"bfloat16": "bf16", "fp8": "fp8"}
KV_BYTES = {"bf16": 2.0, "fp8": 1.0}


def _version_key(v: str):
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.findall(r"\d+|[a-z]+", v)]


def newest(root: Path, gpu: str, op: str, framework: str, filename: str) -> Path | None:
    """The newest version's table `filename` of one op and framework, or None."""
    base = root / gpu / op / framework
    if not base.is_dir():
        return None
    for v in sorted((d.name for d in base.iterdir() if d.is_dir()), key=_version_key, reverse=True):
        if (base / v / filename).is_file():
            return base / v / filename
    return None


def binned(x, eff) -> dict:
    """Median efficiency per breakpoint 4^i of the rows with x in [4^i / 2, 2 x 4^i)."""
    import numpy as np

    x, eff = np.asarray(x, float), np.asarray(eff, float)
    ok = (x > 0) & np.isfinite(eff) & (eff > 0)
    x, eff = x[ok], eff[ok]
    idx = np.round(np.log(x) / np.log(4)).astype(int)
    out = {"x": [], "eff": [], "rows": []}
    for i in sorted(set(idx.tolist())):
        sel = eff[idx == i]
        out["x"].append(4.0 ** i)
        out["eff"].append(float(f"{float(np.median(sel)):.4g}"))
        out["rows"].append(int(sel.size))
    return out


def _curve(x, roof, measured, table: str, root: Path, floor: float | None = None) -> dict | None:
    import numpy as np

    roof, measured, x = (np.asarray(a, float) for a in (roof, measured, x))
    t = measured - (floor or 0.0)
    keep = t > 0
    raw = roof[keep] / t[keep]
    if raw.size == 0:
        return None
    c = binned(x[keep], np.minimum(raw, 1.0))
    c.update(clipped=int(np.sum(raw > 1)), used=int(raw.size), table=str(Path(table).relative_to(root)))
    if floor is not None:
        c["floor_s"] = float(f"{floor:.4g}")
    return c


def _read(path):
    import pandas as pd

    return pd.read_parquet(path)


def gemm(path, s, root) -> dict:
    """{"gemm": {dtype: curve}} over all weight shapes, and {"gemm_nk<b>": {dtype: curve}} for
    the rows whose weight N K is within a factor 2 of 2^b (b even): at a small M a GEMM's
    efficiency depends on its weight size (a 4 M-element weight is mostly fixed latency)."""
    import numpy as np

    d = _read(path)
    d = d[d.gemm_dtype.isin(GEMM_DTYPES) & (d.n >= MIN_NK) & (d.k >= MIN_NK)].copy()
    d["cls"] = d.gemm_dtype.map(GEMM_DTYPES)
    d = d.groupby(["cls", "m", "n", "k"], as_index=False).latency.min()  # the fastest kernel
    d["nk_bin"] = 2 * np.round(np.log(d.n * d.k) / np.log(4)).astype(int)
    out: dict = {}
    for cls, g in d.groupby("cls"):
        w = WEIGHT_BYTES[cls]
        peak = s.peak_flops_fp8 if cls == "fp8" else s.peak_flops
        g = g.assign(roof=[max(2 * m * n * k / peak, ((m * k + k * n) * w + 2 * m * n) / s.hbm_bw)
                           for m, n, k in zip(g.m, g.n, g.k, strict=True)])
        for name, rows in [("gemm", g)] + [(f"gemm_nk{b}", r) for b, r in g.groupby("nk_bin")]:
            c = _curve(rows.m, rows.roof, rows.latency * 1e-3, path, root)
            if c:
                out.setdefault(name, {})[cls] = c
    return out


def moe(path, s, root) -> dict:
    d = _read(path)
    # one GPU holding every expert whole: the rows whose shape means the same under any reading
    # of the table's EP and TP columns (with them, efficiency falls as 1/(ep tp): the tokens
    # per rank are not what T k / ep assumes)
    d = d[(d.distribution == "balanced") & d.moe_dtype.isin(MOE_DTYPES) & (d.moe_ep_size == 1)
          & (d.moe_tp_size == 1)].copy()
    d["cls"] = d.moe_dtype.map(MOE_DTYPES)
    keys = ["cls", "num_tokens", "hidden_size", "inter_size", "topk", "num_experts", "moe_tp_size",
            "moe_ep_size"]
    d = d.groupby(keys, as_index=False).latency.min()
    out = {}
    for cls, g in d.groupby("cls"):
        peak = s.peak_flops_fp8 if cls == "fp8" else s.peak_flops
        roof, x = [], []
        for T, h, i, k, E, tp, ep in zip(g.num_tokens, g.hidden_size, g.inter_size, g.topk, g.num_experts,
                                         g.moe_tp_size, g.moe_ep_size, strict=True):
            rows = T * k / ep
            used = min(E, T * k) / ep
            params = 3 * h * i / tp
            roof.append(max(2 * rows * params / peak,
                            (used * params * WEIGHT_BYTES[cls] + 2 * rows * h * 2) / s.hbm_bw))
            x.append(T * k / E)
        c = _curve(x, roof, g.latency * 1e-3, path, root)
        if c:
            out[cls] = c
    return out


def attention(path, s, root, decode: bool, mla: bool = False) -> dict:
    d = _read(path)
    if "window_size" in d:
        d = d[d.window_size == 0]
    if "beam_width" in d:
        d = d[d.beam_width == 1]
    d = d[d.kv_cache_dtype.isin(KV_DTYPES)].copy()
    d["cls"] = d.kv_cache_dtype.map(KV_DTYPES)
    out = {}
    for cls, g in d.groupby("cls"):
        roof, x = [], []
        for r in g.itertuples():
            h = r.num_heads
            if mla:
                kv_width, hd = MLA_WIDTH, MLA_WIDTH
            else:
                kv_width, hd = 2 * r.num_key_value_heads * r.head_dim, r.head_dim
            if decode:
                ctx = r.isl + r.step
                flops = 4 * r.batch_size * h * hd * ctx
                bytes_ = r.batch_size * ctx * kv_width * KV_BYTES[cls]
                x.append(bytes_)
            else:
                flops = 2 * r.batch_size * h * hd * r.isl * r.isl  # causal: half of 4 b h d isl^2
                bytes_ = r.batch_size * r.isl * (kv_width * KV_BYTES[cls] + 2 * h * hd * 2)
                x.append(r.batch_size * r.isl)
            roof.append(max(flops / s.peak_flops, bytes_ / s.hbm_bw))
        c = _curve(x, roof, g.latency * 1e-3, path, root)
        if c:
            out[cls] = c
    return out


def _a2a_rows(framework: str, root: Path, gpu: str, gpus_per_node: int):
    """(mode, ranks, hidden, topk, experts, tokens, seconds of dispatch + combine) inside one node."""
    rows = []
    if framework == "sglang":
        for mode, name in (("ll", "wideep_deepep_ll_perf.parquet"),
                           ("ht", "wideep_deepep_normal_perf.parquet")):
            path = newest(root, gpu, "comm", framework, name)
            if path is None:
                continue
            d = _read(path)
            d = d[d.node_num == 1]
            if mode == "ll":
                d = d.assign(t=(d.dispatch_avg_t_us + d.combine_avg_t_us) * 1e-6)
            else:
                d = d.assign(t=(d.dispatch_transmit_us + d.dispatch_notify_us + d.combine_transmit_us
                                + d.combine_notify_us) * 1e-6)
            d = d.groupby(["hidden_size", "num_topk", "num_experts", "num_token"], as_index=False).t.min()
            rows += [(mode, gpus_per_node, r.hidden_size, r.num_topk, r.num_experts, r.num_token, r.t, path)
                     for r in d.itertuples()]
        return rows
    path = newest(root, gpu, "comm", framework, "moe_a2a_perf.parquet")
    if path is None:
        return rows
    d = _read(path)
    d = d[d.node_num == 1].copy()
    d["mode"] = d.comm_backend.map(lambda b: "ll" if b.endswith("deepep_ll") else
                                   "ht" if b.endswith("deepep_ht") else None)
    d = d[d["mode"].notna()]
    keys = ["mode", "ep_size", "hidden_size", "topk", "num_experts", "num_tokens"]
    # per phase the fastest setting (SMs, dtype), then dispatch + combine
    d = d.groupby(keys + ["phase"], as_index=False).latency.min()
    d = d.groupby(keys, as_index=False).agg(t=("latency", "sum"), phases=("phase", "nunique"))
    d = d[d.phases == 2]
    return [(r.mode, r.ep_size, r.hidden_size, r.topk, r.num_experts, r.num_tokens, r.t * 1e-6, path)
            for r in d.itertuples()]


def _floor_and_curve(groups: dict, x, roof, t, table, root):
    """floor = median over shapes of each shape's smallest time; then the bandwidth curve."""
    import numpy as np

    floor = float(np.median([min(v) for v in groups.values()]))
    return _curve(x, roof, t, table, root, floor=floor)


def a2a(framework, root, gpu, s) -> dict:
    from moelab.costmodel.closed_form import fanout_tiers

    out = {}
    rows = _a2a_rows(framework, root, gpu, s.gpus_per_node)
    for mode in ("ll", "ht"):
        sel = [r for r in rows if r[0] == mode]
        if not sel:
            continue
        groups, x, roof, t = {}, [], [], []
        for _, R, h, k, E, T, sec, _path in sel:
            copies = fanout_tiers(int(R), int(E), int(k), int(R)).intra
            b = copies * T * h * (2 + 2)
            groups.setdefault((R, h, k, E), []).append(sec)
            x.append(b)
            roof.append(b / s.b_nvlink)
            t.append(sec)
        c = _floor_and_curve(groups, x, roof, t, sel[0][7], root)
        if c:
            out[f"a2a_{mode}"] = {"bf16": c}
    return out


def allreduce(framework, root, gpu, s) -> dict:
    path = newest(root, gpu, "comm", framework, "custom_allreduce_perf.parquet")
    if path is None:
        return {}
    d = _read(path)
    if "backend" in d and d.backend.str.contains("graph").any():
        d = d[d.backend.str.contains("graph")]  # decode runs under CUDA graphs
    d = d.groupby(["num_gpus", "message_size"], as_index=False).latency.min()
    groups = {n: list(g.latency * 1e-3) for n, g in d.groupby("num_gpus")}
    nbytes = d.message_size * 2.0  # message_size counts bf16 elements
    roof = 2 * (d.num_gpus - 1) / d.num_gpus * nbytes / s.b_nvlink
    c = _floor_and_curve(groups, nbytes, roof, d.latency * 1e-3, path, root)
    return {"allreduce": {"bf16": c}} if c else {}


def derive_gpu(root: Path, gpu: str, s) -> dict:
    out = {}
    for fw in FRAMEWORKS:
        classes = {}
        p = newest(root, gpu, "gemm", fw, "gemm_perf.parquet")
        if p:
            classes.update(gemm(p, s, root))
        p = newest(root, gpu, "moe", fw, "moe_perf.parquet")
        if p:
            classes["moe"] = moe(p, s, root)
        p = newest(root, gpu, "attention", fw, "generation_attention_perf.parquet")
        if p:
            classes["attn_decode"] = attention(p, s, root, decode=True)
        p = newest(root, gpu, "attention", fw, "context_attention_perf.parquet")
        if p:
            classes["attn_prefill"] = attention(p, s, root, decode=False)
        p = newest(root, gpu, "mla", fw, "generation_mla_perf.parquet")
        if p:
            classes["mla_decode"] = attention(p, s, root, decode=True, mla=True)
        classes.update(a2a(fw, root, gpu, s))
        classes.update(allreduce(fw, root, gpu, s))
        classes = {k: v for k, v in classes.items() if v}
        if classes:
            out[fw] = classes
    return out


def defaults(gpus: dict) -> dict:
    """Per framework (and 'any': all frameworks) the median across the table GPUs, per class,
    dtype and breakpoint: what a GPU without tables gets."""
    import numpy as np

    pools: dict = {}
    for per_fw in gpus.values():
        for fw, classes in per_fw["frameworks"].items():
            for cls, dtypes in classes.items():
                for dt, c in dtypes.items():
                    for key in (fw, "any"):
                        pools.setdefault(key, {}).setdefault(cls, {}).setdefault(dt, []).append(c)
    out: dict = {}
    for key, classes in pools.items():
        for cls, dtypes in classes.items():
            for dt, curves in dtypes.items():
                xs = sorted({x for c in curves for x in c["x"]})
                at = [[c["eff"][c["x"].index(x)] for c in curves if x in c["x"]] for x in xs]
                eff = [float(f"{float(np.median(v)):.4g}") for v in at]
                d = {"x": xs, "eff": eff, "curves": len(curves)}
                floors = [c["floor_s"] for c in curves if "floor_s" in c]
                if floors:
                    d["floor_s"] = float(f"{float(np.median(floors)):.4g}")
                out.setdefault(key, {}).setdefault(cls, {})[dt] = d
    return out


def derive(root: Path, wheel_name: str = "", sha256: str = "") -> dict:
    from moelab.costmodel.presets import load_system

    gpus, skipped = {}, []
    for d in sorted(p.name for p in root.iterdir() if p.is_dir()):
        if d not in TABLE_GPUS:
            skipped.append(d)
            continue
        s = load_system(TABLE_GPUS[d], measured=True)
        fws = derive_gpu(root, d, s)
        if fws:
            gpus[TABLE_GPUS[d]] = {"table_gpu": d, "frameworks": fws}
    clipped = sum(c.get("clipped", 0) for g in gpus.values() for f in g["frameworks"].values()
                  for cls in f.values() for c in cls.values())
    used = sum(c.get("used", 0) for g in gpus.values() for f in g["frameworks"].values()
               for cls in f.values() for c in cls.values())
    return {
        "about": "Achieved efficiency (roofline / measured, <= 1) per GPU, framework, op class and dtype, "
                 "as a function of the op's shape x; derived by costmodel/predict/derive_efficiency.py "
                 "(its docstring defines each class, its x and its roofline). Curves: medians per "
                 "breakpoint 4^i; interpolate in log x, clamp at the ends.",
        "source": {"package": PACKAGE, "version": VERSION, "wheel": wheel_name, "sha256": sha256,
                   "license": "Apache-2.0", "publisher": "NVIDIA",
                   "tables": "aiconfigurator_core/systems/data/<gpu>/<op>/<framework>/<version>/*.parquet"},
        "peaks": "moelab presets (costmodel/presets/systems.json), measured link bandwidths where published",
        "rows_used": used, "rows_clipped": clipped,
        "skipped_gpus": {"no moelab preset": skipped},
        "gpus": gpus,
        "defaults": defaults(gpus),
        "default_note": "a GPU without tables gets, per class, the median across the table GPUs "
                        f"({', '.join(sorted(gpus))}) of the engine's framework "
                        "(llama.cpp: of all frameworks)",
    }


def _fetch_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
                    f"{PACKAGE}=={VERSION}", "-d", str(dest)], check=True)
    return next(dest.glob("aiconfigurator_core-*.whl"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", help=f"the {PACKAGE} {VERSION} wheel [pip download it]")
    ap.add_argument("--tables", help="an unpacked systems/data folder instead of a wheel")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if a.tables:
            root, name, sha = Path(a.tables), "", ""
        else:
            wheel = Path(a.wheel) if a.wheel else _fetch_wheel(Path(tmp))
            sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
            with zipfile.ZipFile(wheel) as z:
                names = [n for n in z.namelist() if n.startswith("aiconfigurator_core/systems/data/")]
                z.extractall(tmp, names)
            root, name = Path(tmp) / "aiconfigurator_core/systems/data", wheel.name
        out = derive(root, name, sha)
    text = json.dumps(out, indent=None, separators=(",", ":"), allow_nan=False)
    tmp_out = Path(a.out + ".tmp")
    tmp_out.write_text(text + "\n")
    tmp_out.replace(a.out)  # nothing half-written
    print(f"{a.out}: {len(text):,} bytes, {out['rows_used']:,} rows, {out['rows_clipped']:,} clipped at 1, "
          f"GPUs {', '.join(out['gpus'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
