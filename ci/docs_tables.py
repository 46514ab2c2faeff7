"""Regenerate the preset tables of docs/sources.md from the preset data files.

    .venv/bin/python ci/docs_tables.py          # rewrite the tables in place
    .venv/bin/python ci/docs_tables.py --check  # exit 1 if docs/sources.md is out of date

The figures in docs/sources.md are never typed by hand: they are read from
costmodel/presets/ (models/*.json through the loader, systems.json, published.json), so
the page says what the code uses. tests/test_docs.py runs the check.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "sources.md"
PRESETS = ROOT / "costmodel" / "presets"


def _g(x) -> str:
    return "–" if x is None else f"{x:,}" if isinstance(x, int) else f"{x:g}"


def models_table() -> str:
    from moelab.costmodel.presets import load_model, model_names

    rows = [
        "| preset | d | I | layers (MoE) | E routed / shared / k | expert dtype | S_E [M params] "
        "| config.json |",
        "|:---|---:|---:|---:|---:|:---|---:|:---|",
    ]
    for name in model_names():
        m = load_model(name)
        src = m.source.split(";")[0].strip()
        rows.append(
            f"| {name} | {m.hidden:,} | {m.expert_intermediate:,} | {m.n_layers or m.n_moe_layers} "
            f"({m.n_moe_layers}) | {m.n_experts} / {m.n_shared_experts} / {m.top_k} | {m.expert_dtype} | "
            f"{m.expert_params / 1e6:.1f} | {src} |"
        )
    notes = [f"- **{name}**: {load_model(name).source}" for name in model_names()]
    return "\n".join(rows) + "\n\nWhere each copy came from and what was changed:\n\n" + "\n".join(notes)


def systems_table() -> str:
    data = json.loads((PRESETS / "systems.json").read_text())
    out = [
        "| link | kind | nominal [GB/s] | measured [GB/s] | source |",
        "|:---|:---|---:|---:|:---|",
    ]
    for kind, table in (("host link", data["host_links"]), ("network", data["networks"])):
        for name, link in table.items():
            out.append(
                f"| {name} | {kind} | {_g(link['bandwidth_GBps'])} | {_g(link['measured_GBps'])} "
                f"| {link['source']} |"
            )
    out += [
        "",
        "| GPU | HBM [GB] | HBM [TB/s] | dense bf16 / fp8 [TFLOP/s] | GPUs per node | host link | network "
        "| source |",
        "|:---|---:|---:|---:|---:|:---|:---|:---|",
    ]
    for name, gpu in data["gpus"].items():
        out.append(
            f"| {name} | {_g(gpu['hbm_GB'])} | {_g(gpu['hbm_TBps'])} | {_g(gpu['bf16_dense_TFLOPs'])} / "
            f"{_g(gpu['fp8_dense_TFLOPs'])} | {gpu['gpus_per_node']} | {gpu['host_link']} | {gpu['network']} "
            f"| {gpu['source']} |"
        )
    return "\n".join(out)


def published_list() -> str:
    """The sources registry of published.json, then each measurement set with its source id."""
    data = json.loads((PRESETS / "published.json").read_text())
    sources = data.get("sources", {})
    out = ["| source id | citation | place in it |", "|:---|:---|:---|"]
    out += [f"| {sid} | {s.get('cite', '')} | {s.get('place', '')} |" for sid, s in sources.items()]
    out += ["", "| measurement | what | source id |", "|:---|:---|:---|"]
    for key, entry in data.items():
        if key.startswith("_") or key in ("sources", "link_sources") or not isinstance(entry, dict):
            continue
        for row in entry.get("rows", []):  # end-to-end rows: one figure each
            out.append(f"| {key}: {row['name']} | {_g(row['measured'])} {row['unit']} | {row['source']} |")
        if "rows" in entry:
            continue
        points = entry.get("points", [])
        what = entry.get("caption") or ", ".join(
            f"{k} {_g(v)}" for k, v in entry.items() if isinstance(v, int | float) and not isinstance(v, bool)
        )
        if points:
            what += f"; {len(points)} points: " + "; ".join(
                ", ".join(f"{k} {v if isinstance(v, str) else _g(v)}" for k, v in p.items())
                for p in points
            )
        out.append(f"| {key} | {what} | {entry.get('source', '')} |")
    links = data.get("link_sources", {})
    out += ["", "| link | class | measured figure from | how | nominal figure from |",
            "|:---|:---|:---|:---|:---|"]  # fmt: skip
    for name, link in links.items():
        if name.startswith("_") or name == "excluded":
            continue
        cells = (name, link["class"], link["measured"], link["method"], link["nominal"])
        out.append("| " + " | ".join(cells) + " |")
    for name, why in links.get("excluded", {}).items():
        out.append(f"\nNot validated: {name}: {why}.")
    return "\n".join(out)


def cpus_table() -> str:
    """CPU presets (moelab plan --cpu) as the loader computes them: the whole node."""
    from moelab.costmodel.presets import cpu_names, cpu_table, load_cpu

    out = [
        "| CPU | sockets | cores per socket | DRAM per node [GB/s] | bf16 / int8 per node [TFLOP/s, TOP/s] "
        "by --cpu-isa (first: default) | source |",
        "|:---|---:|---:|---:|:---|:---|",
    ]
    for name in cpu_names():
        c, raw = load_cpu(name), cpu_table()["cpus"][name]
        peaks = "; ".join(
            f"{isa} {f['bf16'] / 1e12:,.1f} / {f['int8'] / 1e12:,.1f}"
            for isa, f in ((i, load_cpu(name, i).matmul_flops) for i in raw["ops_per_core_cycle"]))
        out.append(f"| {name} | {c.sockets} | {raw['cores']} | {c.dram_bw / 1e9:,.1f} | {peaks} "
                   f"| {c.source} |")
    return "\n".join(out)


TABLES = {"models": models_table, "systems": systems_table, "cpus": cpus_table,
          "published": published_list}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(
            rf"(<!-- moelab-table:{name}:start -->\n).*?(<!-- moelab-table:{name}:end -->)", re.S
        )
        if not pattern.search(text):
            raise SystemExit(f"{DOC}: markers for table {name!r} not found")
        table = make()
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    old = DOC.read_text()
    new = render(old)
    if "--check" in argv:
        if new != old:
            print(f"{DOC.relative_to(ROOT)} is out of date: run .venv/bin/python ci/docs_tables.py")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
