"""Model and system presets, read from data files that carry their sources.

- Models: `presets/models/<name>.json`, each the model's published HF config.json plus a
  `_moelab_source` key; read by the same loader as a user's file.
- Systems: `presets/systems.json`: GPUs, host links and networks, each with its source.
  A system preset is a GPU with its usual host link and network; either can be swapped.
  Nominal (datasheet) figures by default, as the seed uses; `measured=True` takes the
  measured figure where a public source gives one.
- CPUs: `presets/cpus.json`.

One schema for a machine: a user's `--system FILE` or `--cpu FILE` holds one entry of
systems.json's "gpus" or cpus.json's "cpus", with the same field names and units, plus
"name". Presets and files pass the same checks (`check_entry`), so a preset that loads
copies into a file that loads (`moelab presets --show NAME --json`).
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

from moelab.costmodel.hf_config import model_from_config, model_from_file
from moelab.costmodel.specs import SpecError, SystemSpec

PRESETS = Path(__file__).parent / "presets"
GB = 1e9  # the seed's GB/s are 1e9 B/s
ISAS = ("amx", "avx512", "avx2", "sve2")  # matrix instruction sets a CPU entry may list
CPU_DTYPES = ("bf16", "int8", "int4")  # the CPU-expert dtypes of measured matrix rates


def is_path(name: str) -> bool:
    """A file the user named (a config.json or system file), not a preset name."""
    return name.endswith(".json") or "/" in name or Path(name).is_file()


def model_names() -> list[str]:
    return sorted(p.stem for p in (PRESETS / "models").glob("*.json"))


def load_model(name: str):
    """A preset name (see `model_names()`) or a path to a local config.json."""
    if is_path(name):
        return model_from_file(name)
    path = PRESETS / "models" / f"{name}.json"
    if not path.is_file():
        raise SpecError(
            f"model: unknown preset {name!r} (known: {', '.join(model_names())}; "
            "or give a path to a config.json)"
        )
    cfg = json.loads(path.read_text())
    return model_from_config(cfg, name=name, source=cfg.get("_moelab_source", ""))


# --- the schema: field -> (kind, required) ------------------------------------------------
# Kinds: "str"; "pos" a number > 0; "pos?" a number > 0 or null; "nonneg?" >= 0 or null;
# "int" an integer >= 1; "int?" the same or null; "link" a preset name or an inline link
# object; "link?" the same or null; "isa" ops_per_core_cycle; "dtypes?" {bf16|int8|int4:
# pos?}; "list?" a list of pos; "notes" {field: how it was measured}.
LINK_SCHEMA = {
    "description": ("str", False), "bandwidth_GBps": ("pos?", True), "measured_GBps": ("pos?", False),
    "latency_us": ("nonneg?", False), "latency_kind": ("str", False), "latency_source": ("str", False),
    "source": ("str", True),
}
GPU_SCHEMA = {
    "name": ("str", False), "description": ("str", False),
    "hbm_GB": ("pos", True), "hbm_TBps": ("pos", True),
    "bf16_dense_TFLOPs": ("pos", True),
    "fp8_dense_TFLOPs": ("pos?", True),  # null: no fp8 tensor path, fp8 runs at the bf16 rate
    "fp4_dense_TFLOPs": ("pos?", False),
    "gpus_per_node": ("int", True),
    "host_link": ("link", True), "network": ("link", True),
    "scale_up": ("link?", True),  # null: no scale-up link, GPUs in a node meet over the host link
    "source": ("str", True), "measured": ("notes", False),
}
CPU_SCHEMA = {
    "name": ("str", False), "description": ("str", False),
    "sockets": ("int", True), "cores": ("int", True), "base_GHz": ("pos?", True),
    "dram_channels": ("int?", True), "dram_MTps": ("pos?", True), "dram_GBps": ("pos?", False),
    "dram_measured_GBps": ("pos?", True), "dram_measured_numa_GBps": ("list?", False),
    "ops_per_core_cycle": ("isa", True),
    "matmul_measured_TOPS": ("dtypes?", False), "gemv_measured_GBps": ("dtypes?", False),
    "source": ("str", True), "measured": ("notes", False),
}
LINK_TABLES = {"host_link": "host_links", "network": "networks", "scale_up": "networks"}


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_value(kind: str, v, field: str, where: str, what: str):
    """Raise one SpecError line naming the field and where it is, if `v` is not of `kind`."""
    def bad(expected):
        raise SpecError(f"{what}: {where}: field {field!r} must be {expected}, got {json.dumps(v)[:60]}")

    nullable = kind.endswith("?")
    if v is None and nullable:
        return
    kind = kind.rstrip("?")
    if kind == "str" and not isinstance(v, str):
        bad("a string")
    if kind == "pos" and not (_is_num(v) and v > 0):
        bad("a number > 0" + (" or null" if nullable else ""))
    if kind == "nonneg" and not (_is_num(v) and v >= 0):
        bad("a number >= 0" + (" or null" if nullable else ""))
    if kind == "int" and not (_is_num(v) and v == int(v) and v >= 1):
        bad("an integer >= 1" + (" or null" if nullable else ""))
    if kind == "list" and not (isinstance(v, list) and all(_is_num(x) and x > 0 for x in v)):
        bad("a list of numbers > 0 or null")
    if kind == "notes" and not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())):
        bad("an object of strings (field: how it was measured)")
    if kind == "link":
        if isinstance(v, str):
            if v not in system_table()[LINK_TABLES[field]]:
                raise SpecError(f"{what}: {where}: field {field!r} names no {LINK_TABLES[field]} preset "
                                f"{v!r} (known: {', '.join(system_table()[LINK_TABLES[field]])})")
        elif isinstance(v, dict):
            check_link(v, where, what, prefix=f"{field}.")
        else:
            bad(f"a {LINK_TABLES[field]} preset name or a link object")
    if kind == "isa":
        if not isinstance(v, dict):
            bad("an object {isa: {dtype: ops per core per cycle}}")
        for isa, rates in v.items():
            if isa not in ISAS:
                raise SpecError(f"{what}: {where}: field 'ops_per_core_cycle' has unknown instruction "
                                f"set {isa!r} (known: {', '.join(ISAS)})")
            _check_dtypes(rates, f"{field}.{isa}", where, what, nullable=False)
    if kind == "dtypes":
        _check_dtypes(v, field, where, what, nullable=True)


def _check_dtypes(v, field: str, where: str, what: str, nullable: bool):
    if not isinstance(v, dict):
        raise SpecError(f"{what}: {where}: field {field!r} must be an object {{dtype: number}}, "
                        f"got {json.dumps(v)[:60]}")
    for dtype, x in v.items():
        if dtype not in CPU_DTYPES:
            raise SpecError(f"{what}: {where}: field {field!r} has unknown dtype {dtype!r} "
                            f"(known: {', '.join(CPU_DTYPES)})")
        _check_value("pos?" if nullable else "pos", x, f"{field}.{dtype}", where, what)


def check_entry(entry, schema: dict, where: str, what: str, prefix: str = "") -> dict:
    """One entry against its schema: every field known, every required one present, each of
    its kind. The message names the first offending field and where the entry is."""
    if not isinstance(entry, dict):
        raise SpecError(f"{what}: {where}{' field ' + repr(prefix[:-1]) if prefix else ''} must hold "
                        f"a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(schema))
    if unknown:
        raise SpecError(f"{what}: {where}: unknown field(s) {', '.join(prefix + u for u in unknown)} "
                        f"(known: {', '.join(schema)})")
    for field, (kind, required) in schema.items():
        if field not in entry:
            if required:
                raise SpecError(f"{what}: {where}: missing field {prefix + field!r}")
            continue
        _check_value(kind, entry[field], prefix + field if kind not in ("link", "link?") else field,
                     where, what)
    return entry


def check_link(link, where: str, what: str = "system", prefix: str = "") -> dict:
    """A host_links / networks entry, in systems.json or inline in a GPU entry."""
    check_entry(link, LINK_SCHEMA, where, what, prefix=prefix)
    if link["bandwidth_GBps"] is None and not link.get("measured_GBps"):
        raise SpecError(f"{what}: {where}: field '{prefix}bandwidth_GBps' is null and no "
                        "measured_GBps is given")
    return link


@cache
def system_table() -> dict:
    return json.loads((PRESETS / "systems.json").read_text())


def system_names() -> list[str]:
    return sorted(system_table()["gpus"])


def _pick(table: str, name: str) -> dict:
    entries = system_table()[table]
    if name not in entries:
        raise SpecError(f"{table[:-1]}: unknown preset {name!r} (known: {', '.join(entries)})")
    return entries[name]


def _bandwidth(link: dict, measured: bool) -> float:
    """A link's B/s: nominal, or measured where asked and known; a link whose nominal figure
    is null (a calibrated file's) has only its measurement."""
    value = link.get("measured_GBps") if measured or link["bandwidth_GBps"] is None else None
    return (value or link["bandwidth_GBps"]) * GB


def _link(ref, table: str) -> tuple[str, dict]:
    """(name, entry) of a link field: a preset name, or an inline object (named "inline")."""
    if isinstance(ref, dict):
        return ref.get("description", "inline"), ref
    return ref, check_link(_pick(table, ref), f"preset {ref} (costmodel/presets/systems.json {table})")


def gpu_entry(name: str, data=None) -> tuple[str, dict, str]:
    """(name, checked entry, where) of a GPU preset or a GPU file in the presets' schema;
    `data`: the file's JSON where the caller has read it already."""
    if is_path(name):
        from moelab.costmodel.jsonfile import read_json

        if data is None:
            data = read_json(name, "system")
        if not isinstance(data, dict):
            raise SpecError(f"system: {name} must hold a JSON object, got {type(data).__name__}")
        return data.get("name") or Path(name).stem, check_entry(data, GPU_SCHEMA, name, "system"), name
    where = f"preset {name} (costmodel/presets/systems.json)"
    return name, check_entry(_pick("gpus", name), GPU_SCHEMA, where, "system"), where


def load_system(name: str = "h100-sxm", host_link: str | None = None,
                network: str | None = None, measured: bool = False,
                latencies: bool = False) -> SystemSpec:
    """A GPU preset with its host link and network, or a path to a system JSON file.

    A system file holds one entry in systems.json's "gpus" schema (the same path as a
    preset); an old file in SystemSpec's SI fields (b_pcie, b_net, ...: what calibrate
    wrote before issue 20) is still read as it was. `latencies=True` takes the links'
    latencies (published, fitted or measured); the seed ignores them (0).
    """
    data = None
    if is_path(name):
        from moelab.costmodel.jsonfile import read_json

        data = read_json(name, "system")
        if isinstance(data, dict) and any(k in data for k in LEGACY_KEYS):
            return _legacy_system(data, name)
    return system_from_entry(*gpu_entry(name, data), host_link=host_link, network=network,
                             measured=measured, latencies=latencies)


def system_from_entry(name: str, gpu: dict, where: str, host_link: str | None = None,
                      network: str | None = None, measured: bool = False,
                      latencies: bool = False) -> SystemSpec:
    """A SystemSpec from one "gpus" entry (checked here), as `load_system` describes."""
    check_entry(gpu, GPU_SCHEMA, where, "system")
    link_name, link = _link(host_link or gpu["host_link"], "host_links")
    net_name, net = _link(network or gpu["network"], "networks")
    if gpu["scale_up"] is None:  # no NVLink: the GPUs of a node exchange over the host link
        up_name, up = f"none (host link {link_name})", link
    else:
        up_name, up = _link(gpu["scale_up"], "networks")
    fp8 = gpu["fp8_dense_TFLOPs"]
    return SystemSpec(
        name=name,
        b_pcie=_bandwidth(link, measured),
        b_net=_bandwidth(net, measured),
        b_nvlink=_bandwidth(up, measured),
        alpha_pcie=(link.get("latency_us") or 0) * 1e-6 if latencies else 0.0,
        alpha_net=(net.get("latency_us") or 0) * 1e-6 if latencies else 0.0,
        hbm_bw=gpu["hbm_TBps"] * 1e12,
        peak_flops=gpu["bf16_dense_TFLOPs"] * 1e12,
        # No fp8 tensor path (null): fp8 weights are upcast and run at the bf16 rate.
        peak_flops_fp8=(fp8 or gpu["bf16_dense_TFLOPs"]) * 1e12,
        # No fp4 tensor path (null): 0, and NVFP4 experts run weight-only at bf16 (plan.expert_lane).
        peak_flops_fp4=(gpu.get("fp4_dense_TFLOPs") or 0) * 1e12,
        hbm_bytes=gpu["hbm_GB"] * 1e9,
        gpus_per_node=int(gpu["gpus_per_node"]),
        host_link=link_name,
        network=net_name,
        source=(f"{gpu['source']}; {link_name}: {link['source']}; {net_name}: {net['source']}; "
                f"scale-up {up_name}: {up['source']}"
                + ("" if fp8 else "; no fp8 tensor path: fp8 at the bf16 rate")),
    )


def link_inputs(name: str = "h100-sxm", host_link: str | None = None,
                network: str | None = None) -> dict:
    """Where `measured=True, latencies=True` gets each input: {input: (value SI, source)}.

    A missing measurement falls back to the nominal figure and a missing latency to 0,
    and the source says so.
    """
    _, gpu, _ = gpu_entry(name)
    refs = {"b_pcie": (host_link or gpu["host_link"], "host_links"),
            "b_net": (network or gpu["network"], "networks")}
    if gpu["scale_up"] is not None:
        refs["b_nvlink"] = (gpu["scale_up"], "networks")
    out = {}
    for key, (ref, table) in refs.items():
        link, e = _link(ref, table)
        kind = "measured" if e.get("measured_GBps") else "nominal (no measurement)"
        out[key] = (_bandwidth(e, True), f"{link} {kind}: {e['source']}")
    for key, (ref, table) in (("alpha_pcie", refs["b_pcie"]), ("alpha_net", refs["b_net"])):
        link, e = _link(ref, table)
        if e.get("latency_us"):
            out[key] = (e["latency_us"] * 1e-6,
                        f"{link} {e.get('latency_kind', 'published')}: "
                        f"{e.get('latency_source', e['source'])}")
        else:
            out[key] = (0.0, f"{link}: no published latency; 0")
    return out


LEGACY_KEYS = ("b_pcie", "b_net")  # SystemSpec's SI fields: an old system file


def _legacy_system(data: dict, path: str) -> SystemSpec:
    """An old system file's JSON (SystemSpec's fields in SI units: it holds b_pcie or b_net)."""
    known = list(SystemSpec.__dataclass_fields__)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SpecError(f"system: {path}: unknown field(s) {', '.join(unknown)} in an old SI system "
                        f"file (b_pcie, b_net, ...; known: {', '.join(known)})")
    for required in LEGACY_KEYS:
        if required not in data:
            raise SpecError(f"system: {path}: missing field {required!r} (B/s) of an old SI system file")
    data.setdefault("name", Path(path).stem)
    return SystemSpec(**data)


def preset_entry(name: str) -> dict:
    """One GPU or CPU preset as a file holds it (`moelab presets --show NAME --json`)."""
    for entries in (system_table()["gpus"], cpu_table()["cpus"]):
        if name in entries:
            return {"name": name, **entries[name]}
    known = sorted(system_table()["gpus"]) + sorted(cpu_table()["cpus"])
    raise SpecError(f"show: no GPU or CPU preset {name!r} (known: {', '.join(known)})")


# --- added for `moelab plan` (issue 11): raw configs and CPU presets ----------------------


def model_config(name: str) -> dict:
    """The config.json behind a model preset or a path: what memory.py counts from."""
    from moelab.costmodel.hf_config import load_config

    if is_path(name):
        cfg = load_config(name)
    else:
        path = PRESETS / "models" / f"{name}.json"
        if not path.is_file():
            load_model(name)  # raises the usual unknown-preset message
        cfg = json.loads(path.read_text())
    if not isinstance(cfg, dict):
        raise SpecError(f"config.json: expected a JSON object, got {type(cfg).__name__}")
    return cfg


@cache
def cpu_table() -> dict:
    return json.loads((PRESETS / "cpus.json").read_text())


def cpu_names() -> list[str]:
    return sorted(cpu_table()["cpus"])


def nominal_dram_GBps(c: dict) -> float | None:
    """Nominal DRAM GB/s per socket: channels x MT/s x 8 bytes per transfer, else dram_GBps
    (where no channel count is published), else None (unknown)."""
    if c["dram_channels"] and c["dram_MTps"]:
        return c["dram_channels"] * c["dram_MTps"] * 8 / 1e3
    return c.get("dram_GBps")


def cpu_entry(name: str) -> tuple[str, dict, str]:
    """(name, checked entry, where) of a CPU preset or a CPU file in the presets' schema."""
    if is_path(name):
        from moelab.costmodel.jsonfile import read_json

        data = read_json(name, "cpu")
        if not isinstance(data, dict):
            raise SpecError(f"cpu: {name} must hold a JSON object, got {type(data).__name__}")
        where, name = name, data.get("name") or Path(name).stem
    else:
        entries = cpu_table()["cpus"]
        if name not in entries:
            raise SpecError(f"cpu: unknown preset {name!r} (known: {', '.join(sorted(entries))}; "
                            "or give a path to a CPU file)")
        data, where = entries[name], f"preset {name} (costmodel/presets/cpus.json)"
    c = check_entry(data, CPU_SCHEMA, where, "cpu")
    nominal = nominal_dram_GBps(c)
    if not nominal and not c["dram_measured_GBps"]:
        raise SpecError(f"cpu: {where}: no DRAM bandwidth: give dram_channels and dram_MTps, "
                        "dram_GBps or dram_measured_GBps")
    if nominal and (c["dram_measured_GBps"] or 0) > nominal:  # a measurement cannot beat the bus
        raise SpecError(f"cpu: {where}: field 'dram_measured_GBps' {c['dram_measured_GBps']:g} GB/s "
                        f"exceeds the nominal {nominal:g} GB/s (channels x MT/s x 8 B or dram_GBps)")
    if c["ops_per_core_cycle"] and c["base_GHz"] is None:
        raise SpecError(f"cpu: {where}: field 'base_GHz' is null, but ops_per_core_cycle needs a clock")
    measured = c.get("matmul_measured_TOPS") or {}
    for dtype in ("bf16", "int8"):
        if not measured.get(dtype) and not any(dtype in r for r in c["ops_per_core_cycle"].values()):
            raise SpecError(f"cpu: {where}: no {dtype} matrix rate: give ops_per_core_cycle or "
                            f"matmul_measured_TOPS.{dtype}")
    return name, c, where


def load_cpu(name: str, isa: str | None = None, sockets: int | None = None):
    """A CPU preset (see `cpu_names()`) or a CPU file as a CpuSpec (costmodel/plan.py), its
    matrix peak at instruction set `isa` (one of the entry's ops_per_core_cycle keys; default:
    the first, its best), on `sockets` sockets per node (default: the entry's; e.g. 1 for a
    run pinned to one socket). Figures in the file are per socket; the CpuSpec's per node."""
    from moelab.costmodel.plan import CpuSpec

    name, c, where = cpu_entry(name)
    rates = c["ops_per_core_cycle"]
    if isa is None:
        isa = next(iter(rates), "")
    elif isa not in rates:
        raise SpecError(f"cpu_isa: {name} has no {isa!r} matrix path "
                        f"(known: {', '.join(rates) or 'none: measured rates only'})")
    sockets = int(c["sockets"]) if sockets is None else sockets
    if isinstance(sockets, bool) or not isinstance(sockets, int) or sockets < 1:
        raise SpecError(f"cpu_sockets: must be an integer >= 1, got {sockets!r}")
    per_socket = (nominal_dram_GBps(c) or 0) * GB  # matrix peak: cores x clock x ops/cycle

    def per_node(table: dict | None, unit: float) -> dict:
        return {k: v * unit * sockets for k, v in (table or {}).items() if v}

    return CpuSpec(
        name=name,
        sockets=sockets,
        dram_bw=per_socket * sockets,
        dram_bw_measured=(c["dram_measured_GBps"] or 0) * GB * sockets,
        matmul_flops={k: c["cores"] * c["base_GHz"] * 1e9 * ops * sockets
                      for k, ops in rates.get(isa, {}).items()},
        matmul_measured=per_node(c.get("matmul_measured_TOPS"), 1e12),
        gemv_measured=per_node(c.get("gemv_measured_GBps"), GB),
        source=c["source"],
        isa=isa,
    )
