"""What CPU-expert engines achieve against the roofline, from the figures in cpu.json.

Four factors, each computed here from published raw figures (never typed in as a ratio):

- matmul efficiency (engine, instruction set, dtype): achieved ops/s over the peak of the
  machine that achieved them (cores x base clock x ops per core and cycle x sockets, read
  from presets/cpus.json as presets.load_cpu computes it);
- DRAM fraction per socket (engine): the bandwidth a published batch-1 decode implies
  (routed-expert bytes per token over the time per token, the CPU-GPU syncs taken out) over
  the socket's nominal bandwidth, after the engine's NUMA scaling; the mean over the points;
- NUMA scaling (engine, sockets): what two sockets give against one;
- CPU-GPU synchronisation per MoE layer whose experts run on the CPU.

`leaving_out(*sources)` hides every figure of the named sources (the validation predicts a
row without the figures of its own source); a factor without a figure falls back to the
roofline's (efficiency 1, linear in sockets, no sync) and says so in `notes`.

This module reads cpus.json and the model configs by path (not through presets.py, which
imports the planner that imports this module).
"""

from __future__ import annotations

import json
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from moelab.costmodel.hf_config import model_from_config
from moelab.costmodel.specs import SpecError

DATA = Path(__file__).with_name("cpu.json")
PRESETS = Path(__file__).resolve().parents[1] / "presets"
_left_out: tuple[str, ...] = ()


@cache
def table() -> dict:
    return json.loads(DATA.read_text())


@contextmanager
def leaving_out(*sources: str):
    """Within the block, the figures of these source ids are not used."""
    global _left_out
    saved, _left_out = _left_out, tuple(sorted(set(_left_out) | set(sources)))
    try:
        yield
    finally:
        _left_out = saved


def engine_key(engine: str) -> str:
    """The engine whose figures apply: its own, or the default's for one without CPU data."""
    t = table()
    own = any(engine in t[part] for part in ("matmul", "dram", "numa"))
    return engine if own else t["default"]["engine"]


@cache
def _cpu_preset(name: str) -> dict:
    cpus = json.loads((PRESETS / "cpus.json").read_text())["cpus"]
    if name not in cpus:
        raise SpecError(f"cpu.json: unknown CPU preset {name!r}")
    return cpus[name]


def peak_ops(cpu: str, sockets: int, isa: str, dtype: str) -> float:
    """Matrix peak at base clock: cores x clock x ops per core and cycle x sockets (as load_cpu)."""
    c = _cpu_preset(cpu)
    return c["cores"] * c["base_GHz"] * 1e9 * c["ops_per_core_cycle"][isa][dtype] * sockets


def nominal_dram_per_socket(cpu: str) -> float:
    """channels x MT/s x 8 B (or the preset's GB/s), B/s, one socket (as load_cpu)."""
    c = _cpu_preset(cpu)
    return c["dram_channels"] * c["dram_MTps"] * 1e6 * 8 if c.get("dram_channels") else c["dram_GBps"] * 1e9


@cache
def _model(name: str):
    return model_from_config(json.loads((PRESETS / "models" / f"{name}.json").read_text()), name=name)


def routed_weights_per_token(model: str) -> float:
    """Routed-expert weights one token multiplies: MoE layers x top-k x expert parameters."""
    m = _model(model)
    return m.n_moe_layers * m.top_k * m.expert_params


def _usable(figure: dict | None) -> bool:
    return bool(figure) and figure.get("source") not in _left_out


def sync_per_layer() -> tuple[float, str]:
    """CPU-GPU synchronisation per MoE layer with CPU experts (s), and what it is."""
    s = table()["sync"]
    if not _usable(s):
        return 0.0, "no CPU-GPU sync figure (left out): none charged"
    return (s["device_to_host_round_trip_s"] + s["kernel_launch_s"],
            f"sync {1e6 * (s['device_to_host_round_trip_s'] + s['kernel_launch_s']):.3g} us per layer "
            f"({s['source']})")


def numa_scale(engine: str, sockets: int) -> tuple[float, str]:
    """What `sockets` sockets give against one; 1 for one socket. Beyond two: two's per-socket share."""
    if sockets == 1:
        return 1.0, ""
    f = table()["numa"].get(engine_key(engine))
    if not _usable(f):
        return float(sockets), f"no NUMA figure for {engine}: {sockets} sockets scale linearly (roofline)"
    per_socket = f["two_sockets_tokens_per_s"] / f["one_socket_tokens_per_s"] / 2
    note = f"NUMA: 2 sockets give {2 * per_socket:.3g} x one ({f['source']})"
    if sockets > 2:
        note += f"; {sockets} sockets extrapolated at the same share per socket"
    return per_socket * sockets, note


def matmul_efficiency(engine: str, isa: str, dtype: str) -> tuple[float, str]:
    """Achieved over peak matrix throughput of `engine`'s kernels on `isa` at `dtype`."""
    f = table()["matmul"].get(engine_key(engine), {}).get(isa, {}).get(dtype)
    if not _usable(f) or f.get("achieved_ops", 0) is None:
        return 1.0, f"no {isa} {dtype} matrix figure for {engine}: the peak is used (roofline)"
    mach = f["machine"]
    achieved = f["achieved_ops"] if "achieved_ops" in f else \
        f["tokens_per_s"] * 2 * routed_weights_per_token(f["model"])
    eff = achieved / peak_ops(mach["cpu"], mach["sockets"], isa, dtype)
    return eff, f"{isa} {dtype} at {eff:.3g} of peak ({f['source']})"


def dram_fraction(engine: str, dtype_bytes: dict) -> tuple[float, str]:
    """Per socket, achieved over nominal DRAM bandwidth: the mean over the engine's decode points.

    Each point: routed-expert bytes per token (at its format, `dtype_bytes`) over the time per
    token less the CPU-GPU syncs of its MoE layers, over the machine's nominal bandwidth
    scaled by the engine's NUMA factor for its sockets. The GPU's share of the token stays in
    the time, so the fraction is a lower bound of what the CPU reached.
    """
    key = engine_key(engine)
    points = [pt for pt in table()["dram"].get(key, []) if _usable(pt)]
    if not points:
        return 1.0, f"no DRAM figure for {engine}: nominal bandwidth (roofline)"
    sync, _ = sync_per_layer()
    fractions = []
    for pt in points:
        m, mach = _model(pt["model"]), pt["machine"]
        per_token = 1 / pt["tokens_per_s"] - m.n_moe_layers * sync
        bw = routed_weights_per_token(pt["model"]) * dtype_bytes[pt["cpu_expert_dtype"]] / per_token
        scale, _ = numa_scale(key, mach["sockets"])
        fractions.append(bw / (nominal_dram_per_socket(mach["cpu"]) * scale))
    frac = statistics.fmean(fractions)
    return frac, (f"DRAM at {frac:.3g} of nominal per socket (mean of {len(points)}: "
                  f"{', '.join(pt['source'] for pt in points)})")


@dataclass(frozen=True)
class Achieved:
    """The CPU side of one engine on one CPU: factors on the roofline's rates, and their story."""

    matmul_efficiency: float
    dram_fraction: float  # per socket, of nominal
    numa_scale: float  # sockets' bandwidth over one socket's
    sync_s: float  # per MoE layer with CPU experts
    engine: str  # whose figures these are
    notes: tuple[str, ...]
    sources: tuple[tuple[str, tuple[str, ...]], ...] = ()  # factor -> the source ids it used
    serial_dram: bool = False  # the kernel reads weights from DRAM, then multiplies (times add)

    def as_dict(self) -> dict:
        return {"engine": self.engine, "matmul_efficiency": self.matmul_efficiency,
                "dram_fraction": self.dram_fraction, "numa_scale": self.numa_scale,
                "sync_per_layer_s": self.sync_s, "serial_dram": self.serial_dram, "notes": list(self.notes),
                "sources": {k: list(v) for k, v in self.sources}}


def achieved(engine: str, isa: str, dtype: str, sockets: int, dtype_bytes: dict) -> Achieved:
    return _achieved(engine, isa, dtype, sockets, tuple(sorted(dtype_bytes.items())), _left_out)


@cache
def _achieved(engine, isa, dtype, sockets, dtype_bytes, left_out) -> Achieved:
    eff, n1 = matmul_efficiency(engine, isa, dtype)
    frac, n2 = dram_fraction(engine, dict(dtype_bytes))
    numa, n3 = numa_scale(engine, sockets)
    sync, n4 = sync_per_layer()
    serial = serial_with_dram(engine, isa, dtype)
    n5 = "DRAM then matrix units, serial (a kernel rate on cached data)" if serial else ""
    return Achieved(eff, frac, numa, sync, engine_key(engine), tuple(n for n in (n1, n2, n3, n4, n5) if n),
                    _sources_used(engine, isa, dtype, sockets), serial)


def serial_with_dram(engine: str, isa: str, dtype: str) -> bool:
    """Whether the engine's matrix figure is a kernel's rate on data already in cache, its kernel
    bringing each block of weights from DRAM before multiplying it (cpu.json `_serial_with_dram`):
    then DRAM time and matrix time add. A figure left out gives the roofline (the longer of two)."""
    f = table()["matmul"].get(engine_key(engine), {}).get(isa, {}).get(dtype)
    return _usable(f) and bool(f.get("serial_with_dram"))


def _sources_used(engine: str, isa: str, dtype: str, sockets: int) -> tuple:
    """Which source ids each factor took its figures from (none: the roofline's)."""
    t, key = table(), engine_key(engine)
    mat = t["matmul"].get(key, {}).get(isa, {}).get(dtype)
    numa = t["numa"].get(key)
    used = {
        "matmul": [mat["source"]] if _usable(mat) and mat.get("achieved_ops", 0) is not None else [],
        "dram": [pt["source"] for pt in t["dram"].get(key, []) if _usable(pt)],
        "numa": [numa["source"]] if sockets > 1 and _usable(numa) else [],
        "sync": [t["sync"]["source"]] if _usable(t["sync"]) else [],
    }
    if used["dram"] and used["sync"]:  # the DRAM points are read with the syncs taken out
        used["dram"] += used["sync"]
    return tuple((k, tuple(dict.fromkeys(v))) for k, v in used.items())
