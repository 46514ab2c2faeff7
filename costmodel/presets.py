"""Model and system presets, read from data files that carry their sources.

- Models: `presets/models/<name>.json`, each the model's published HF config.json plus a
  `_moelab_source` key; read by the same loader as a user's file.
- Systems: `presets/systems.json`: GPUs, host links and networks, each with its source.
  A system preset is a GPU with its usual host link and network; either can be swapped.
  Nominal (datasheet) figures by default, as the seed uses; `measured=True` takes the
  measured figure where a public source gives one.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from moelab.costmodel.hf_config import model_from_config, model_from_file
from moelab.costmodel.specs import SpecError, SystemSpec

PRESETS = Path(__file__).parent / "presets"
GB = 1e9  # the seed's GB/s are 1e9 B/s


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
    value = link.get("measured_GBps") if measured else None
    return (value or link["bandwidth_GBps"]) * GB


def load_system(name: str = "h100-sxm", host_link: str | None = None,
                network: str | None = None, measured: bool = False,
                latencies: bool = False) -> SystemSpec:
    """A GPU preset with its host link and network, or a path to a system JSON file.

    A system file (as `moelab calibrate` writes) holds SystemSpec's fields in SI units.
    `latencies=True` takes the links' published latencies; the seed ignores them (0).
    """
    if is_path(name):
        return _system_from_file(name)
    gpu = _pick("gpus", name)
    link_name, net_name = host_link or gpu["host_link"], network or gpu["network"]
    link, net = _pick("host_links", link_name), _pick("networks", net_name)
    scale_up = _pick("networks", gpu["scale_up"])
    return SystemSpec(
        name=name,
        b_pcie=_bandwidth(link, measured),
        b_net=_bandwidth(net, measured),
        b_nvlink=_bandwidth(scale_up, measured),
        alpha_pcie=(link.get("latency_us") or 0) * 1e-6 if latencies else 0.0,
        alpha_net=(net.get("latency_us") or 0) * 1e-6 if latencies else 0.0,
        hbm_bw=gpu["hbm_TBps"] * 1e12,
        peak_flops=gpu["bf16_dense_TFLOPs"] * 1e12,
        peak_flops_fp8=gpu["fp8_dense_TFLOPs"] * 1e12,
        hbm_bytes=gpu["hbm_GB"] * 1e9,
        gpus_per_node=gpu["gpus_per_node"],
        host_link=link_name,
        network=net_name,
        source=(f"{gpu['source']}; {link_name}: {link['source']}; {net_name}: {net['source']}; "
                f"scale-up {gpu['scale_up']}: {scale_up['source']}"),
    )


def link_inputs(name: str = "h100-sxm", host_link: str | None = None,
                network: str | None = None) -> dict:
    """Where `measured=True, latencies=True` gets each input: {input: (value SI, source)}.

    A missing measurement falls back to the nominal figure and a missing latency to 0,
    and the source says so.
    """
    gpu = _pick("gpus", name)
    link_name, net_name = host_link or gpu["host_link"], network or gpu["network"]
    out = {}
    for key, table, link in (("b_pcie", "host_links", link_name), ("b_net", "networks", net_name),
                             ("b_nvlink", "networks", gpu["scale_up"])):
        e = _pick(table, link)
        kind = "measured" if e.get("measured_GBps") else "nominal (no measurement)"
        out[key] = (_bandwidth(e, True), f"{link} {kind}: {e['source']}")
    for key, table, link in (("alpha_pcie", "host_links", link_name),
                             ("alpha_net", "networks", net_name)):
        e = _pick(table, link)
        if e.get("latency_us"):
            out[key] = (e["latency_us"] * 1e-6,
                        f"{link} {e.get('latency_kind', 'published')}: "
                        f"{e.get('latency_source', e['source'])}")
        else:
            out[key] = (0.0, f"{link}: no published latency; 0")
    return out


def _system_from_file(path: str) -> SystemSpec:
    from moelab.costmodel.jsonfile import read_json  # size, encoding, depth, truncation: one line

    data = read_json(path, "system")
    if not isinstance(data, dict):
        raise SpecError(f"system: {path} must hold a JSON object")
    known = set(SystemSpec.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"system: {path} has unknown field(s) {', '.join(unknown)}")
    for required in ("b_pcie", "b_net"):
        if required not in data:
            raise SpecError(f"system: {path} lacks {required} (B/s)")
    data.setdefault("name", Path(path).stem)
    return SystemSpec(**data)


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


def load_cpu(name: str, isa: str | None = None, sockets: int | None = None):
    """A CPU preset (see `cpu_names()`) as a CpuSpec (costmodel/plan.py), its matrix peak at
    instruction set `isa` (one of the preset's ops_per_core_cycle keys; default: the first, its best),
    on `sockets` sockets per node (default: the preset's; e.g. 1 for a run pinned to one socket)."""
    from moelab.costmodel.plan import CpuSpec

    entries = cpu_table()["cpus"]
    if name not in entries:
        raise SpecError(f"cpu: unknown preset {name!r} (known: {', '.join(sorted(entries))})")
    c = entries[name]
    rates = c["ops_per_core_cycle"]
    isa = next(iter(rates)) if isa is None else isa
    if isa not in rates:
        raise SpecError(f"cpu_isa: {name} has no {isa!r} matrix path (known: {', '.join(rates)})")
    sockets = c["sockets"] if sockets is None else sockets
    if isinstance(sockets, bool) or not isinstance(sockets, int) or sockets < 1:
        raise SpecError(f"cpu_sockets: must be an integer >= 1, got {sockets!r}")
    # Nominal DRAM: channels x MT/s x 8 bytes per transfer; matrix peak: cores x clock x ops/cycle.
    per_socket = (c["dram_channels"] * c["dram_MTps"] * 1e6 * 8 if c.get("dram_channels")
                  else c["dram_GBps"] * GB)
    return CpuSpec(
        name=name,
        sockets=sockets,
        dram_bw=per_socket * sockets,
        dram_bw_measured=(c.get("dram_measured_GBps") or 0) * GB * sockets,
        matmul_flops={k: c["cores"] * c["base_GHz"] * 1e9 * ops * sockets
                      for k, ops in rates[isa].items()},
        source=c["source"],
        isa=isa,
    )
