"""`moelab presets`: the model and system presets, with their sources."""

from __future__ import annotations

import json

HELP = "list model and system presets with their key figures and sources"


def add_arguments(p):
    p.add_argument("kind", nargs="?", choices=("models", "systems", "cpus", "all"), default="all")
    p.add_argument("--json", action="store_true", help="print JSON (SI units)")
    p.add_argument("--show", metavar="NAME",
                   help="print one GPU or CPU preset as a file in the presets' schema, ready to copy "
                        "and edit for --system FILE or --cpu FILE")


def rows(kind: str) -> dict:
    from moelab.costmodel.presets import load_model, load_system, model_names, system_names

    out = {}
    if kind in ("models", "all"):
        out["models"] = []
        for name in model_names():
            m = load_model(name)
            out["models"].append({
                "name": name, "L": m.n_moe_layers, "layers": m.n_layers, "E": m.n_experts,
                "k": m.top_k, "d": m.hidden, "I": m.expert_intermediate,
                "S_E": m.expert_params, "shared": m.n_shared_experts,
                "expert_dtype": m.expert_dtype, "expert_bytes": m.expert_bytes,
                "n_group": m.n_group, "topk_group": m.topk_group, "source": m.source})
    if kind in ("systems", "all"):
        out["systems"] = []
        for name in system_names():
            s = load_system(name)
            out["systems"].append({
                "name": name, "b_pcie": s.b_pcie, "b_net": s.b_net, "host_link": s.host_link,
                "network": s.network, "hbm_bytes": s.hbm_bytes, "hbm_bw": s.hbm_bw,
                "peak_flops": s.peak_flops, "gpus_per_node": s.gpus_per_node, "source": s.source})
    if kind in ("cpus", "all"):
        from moelab.costmodel.presets import cpu_names, cpu_table, load_cpu

        out["cpus"] = []
        for name in cpu_names():
            c = load_cpu(name)
            by_isa = {isa: load_cpu(name, isa).matmul_flops
                      for isa in cpu_table()["cpus"][name]["ops_per_core_cycle"]}
            out["cpus"].append({"name": name, "sockets": c.sockets, "dram_bw": c.dram_bw,
                                "dram_bw_measured": c.dram_bw_measured or None,
                                "isa": c.isa, "matmul_flops": c.matmul_flops,
                                "matmul_flops_by_isa": by_isa, "source": c.source})
    return out


def run(args) -> int:
    if args.show:  # the entry itself (the file's schema), with or without --json
        from moelab.costmodel.presets import preset_entry

        print(json.dumps(preset_entry(args.show), indent=2))
        return 0
    data = rows(args.kind)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from rich.table import Table

    from moelab.show import console

    out = console()
    if "models" in data:
        t = Table(title="models (HF config.json presets)", title_justify="left")
        for col in ("name", "L (MoE)", "E", "k", "d", "I", "S_E", "expert dtype", "S_E f_E"):
            t.add_column(col, justify="left" if col in ("name", "expert dtype") else "right")
        for m in data["models"]:
            t.add_row(m["name"], str(m["L"]), str(m["E"]), str(m["k"]), str(m["d"]),
                      str(m["I"]), f"{m['S_E'] / 1e6:.1f}M", m["expert_dtype"],
                      f"{m['expert_bytes'] / 1e6:.1f} MB")
        out.print(t)
    if "systems" in data:
        # the links' nominal bandwidths: plan uses measured ones unless --nominal, gamma with --measured-links
        t = Table(title="systems (nominal link bandwidths)", title_justify="left")
        for col in ("name", "memory", "memory BW", "host link", "B_pcie", "network", "B_net", "bf16"):
            t.add_column(col)
        for s in data["systems"]:
            t.add_row(s["name"], f"{s['hbm_bytes'] / 1e9:g} GB", f"{s['hbm_bw'] / 1e12:g} TB/s",
                      s["host_link"], f"{s['b_pcie'] / 1e9:g} GB/s", s["network"],
                      f"{s['b_net'] / 1e9:g} GB/s", f"{s['peak_flops'] / 1e12:g} TFLOP/s")
        out.print(t)
    if "cpus" in data:
        t = Table(title="CPUs per node, for moelab plan --cpu (nominal DRAM; matrix peak at base clock)",
                  title_justify="left")
        for col in ("name", "sockets", "DRAM", "--cpu-isa", "bf16", "int8"):
            t.add_column(col)
        for c in data["cpus"]:
            for isa, f in c["matmul_flops_by_isa"].items():
                t.add_row(c["name"], str(c["sockets"]), f"{c['dram_bw'] / 1e9:,.0f} GB/s",
                          isa + (" (default)" if isa == c["isa"] else ""),
                          f"{f['bf16'] / 1e12:,.1f} TFLOP/s", f"{f['int8'] / 1e12:,.1f} TOP/s")
        out.print(t)
    return 0
