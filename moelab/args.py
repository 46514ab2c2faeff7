"""Command-line flags shared by the commands that evaluate gamma, and their translation to specs.

Flags take human units (GB/s = 1e9 B/s, µs); specs and JSON are SI.
"""

from __future__ import annotations

import argparse

from moelab.costmodel.specs import (
    DISPATCH_MODES,
    DTYPE_BYTES,
    ModelSpec,
    Options,
    SpecError,
    SystemSpec,
    Workload,
    check_placement,
)

DTYPES = sorted(DTYPE_BYTES)


def add_model_system_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and system")
    g.add_argument("--model", default="deepseek-r1",
                   help="preset name (moelab presets) or path to a HF config.json [deepseek-r1]")
    g.add_argument("--system", default="h100-sxm",
                   help="GPU preset or path to a system JSON (moelab calibrate) [h100-sxm]")
    g.add_argument("--host-link", help="host-link preset replacing the system's (e.g. pcie-gen4-x16)")
    g.add_argument("--network", help="network preset replacing the system's (e.g. roce-100g)")
    g.add_argument("--measured-links", action="store_true",
                   help="use measured link bandwidths where published, not nominal ones")
    g.add_argument("--b-pcie", type=float, metavar="GB/s", help="host-link bandwidth [preset]")
    g.add_argument("--b-net", type=float, metavar="GB/s", help="network bandwidth [preset]")
    g.add_argument("--expert-dtype", choices=DTYPES, help="expert weight dtype [config]")
    g.add_argument("--act-dtype", choices=DTYPES, help="activation dtype [config]")


def _tokens(text: str) -> int | str:
    """--tokens: an integer, or `trace` (the recorded passes of a --routing trace:FILE)."""
    if text == "trace":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def add_workload_args(p: argparse.ArgumentParser, tokens_default: int | None = 4096) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--tokens", type=_tokens, default=None, metavar="N_t",
                   help=f"prefill tokens, or `trace`: the passes a trace recorded [{tokens_default}]")
    g.add_argument("--decode", action="store_true", help="decode instead of prefill")
    g.add_argument("--batch", type=int, default=1, metavar="B", help="decode batch [1]")
    g.add_argument("--steps", type=int, default=1, metavar="N_OS", help="decode steps [1]")
    p.set_defaults(_tokens_default=tokens_default)


def add_option_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("past the seed (defaults reproduce the seed)")
    g.add_argument("--dispatch-dtype", choices=DTYPES, help="dtype of activations sent [act]")
    g.add_argument("--combine-dtype", choices=DTYPES, help="dtype of expert outputs returned [act]")
    fan = g.add_mutually_exclusive_group()
    fan.add_argument("--fanout", type=float, metavar="PHI", help="remote destinations per token [1]")
    fan.add_argument("--ep-ranks", type=int, metavar="R",
                     help="derive the fan-out from R EP ranks, experts spread uniformly")
    g.add_argument("--gpus-per-node", type=int, metavar="G",
                   help="with --ep-ranks: GPUs per node (NVLink inside, the network between) [system]")
    g.add_argument("--dispatch-mode", choices=DISPATCH_MODES, default="per-node",
                   help="with --ep-ranks: one network copy per remote node, forwarded over NVLink "
                        "(DeepEP normal kernels), or one per remote rank [per-node]")
    g.add_argument("--redundant-experts", type=int, default=0, metavar="N",
                   help="with --ep-ranks: N extra expert slots holding replicas of the hottest "
                        "experts (EPLB-like) [0]")
    g.add_argument("--alpha-pcie-us", type=float, metavar="µs", help="latency per expert copy [0]")
    g.add_argument("--alpha-net-us", type=float, metavar="µs", help="latency per collective [0]")
    g.add_argument("--latencies", action="store_true",
                   help="take both latencies from the link presets")
    g.add_argument("--resident-fraction", type=float, default=0.0, metavar="H",
                   help="share of used experts already on the GPU [0]")


def spec_kwargs(args) -> dict:
    """The API's model, system, workload and option arguments from parsed flags (GB/s -> B/s,
    µs -> s). A bad flag raises SpecError naming the flag as the user typed it."""
    kwargs = {"model": args.model, "system": args.system, "expert_dtype": args.expert_dtype,
              "act_dtype": args.act_dtype, "host_link": args.host_link, "network": args.network,
              "measured_links": args.measured_links, "latencies": getattr(args, "latencies", False)}
    for flag, name in (("b_pcie", "b_pcie"), ("b_net", "b_net"), ("alpha_pcie_us", "alpha_pcie"),
                       ("alpha_net_us", "alpha_net")):
        value = getattr(args, flag, None)
        if value is not None:
            bandwidth = name.startswith("b_")
            _check_flag(flag, value, positive=bandwidth)
            # GB/s -> B/s, µs -> s (a division keeps 10 µs exactly 1e-05 s)
            kwargs[name] = value * 1e9 if bandwidth else value / 1e6
    if args.decode:
        if args.tokens is not None:
            raise SpecError("--tokens: give --tokens for prefill or --decode --batch B, not both")
        kwargs.update(decode=True, batch=args.batch, steps=args.steps)
    else:
        kwargs["tokens"] = args.tokens if args.tokens is not None else args._tokens_default
    for name in ("fanout", "ep_ranks", "dispatch_dtype", "combine_dtype"):
        kwargs[name] = getattr(args, name, None)
    kwargs["resident_fraction"] = getattr(args, "resident_fraction", 0.0)
    gpn = getattr(args, "gpus_per_node", None)
    if gpn is not None and gpn < 1:
        raise SpecError(f"--gpus-per-node: must be >= 1, got {gpn}")
    redundant = getattr(args, "redundant_experts", 0) or 0
    if redundant < 0:
        raise SpecError(f"--redundant-experts: must be >= 0, got {redundant}")
    kwargs.update(gpus_per_node=gpn, dispatch_mode=getattr(args, "dispatch_mode", "per-node"),
                  redundant_experts=redundant)
    return kwargs


def build_specs(args) -> tuple[ModelSpec, SystemSpec, Workload, Options]:
    """Specs from parsed flags (closed-form routing: worst or uniform)."""
    from moelab import api

    kw = spec_kwargs(args)
    model = api.model_spec(kw["model"], kw["expert_dtype"], kw["act_dtype"])
    system = api.system_spec(kw["system"], **{k: kw.get(k) for k in (
        "host_link", "network", "measured_links", "latencies", "b_pcie", "b_net", "alpha_pcie",
        "alpha_net", "gpus_per_node")})
    workload = api.workload(kw.get("tokens"), kw.get("decode", False), kw.get("batch", 1),
                            kw.get("steps", 1))
    check_placement(model.n_experts, kw["ep_ranks"], kw["redundant_experts"])
    options = Options(fanout=kw["fanout"], ep_ranks=kw["ep_ranks"],
                      dispatch_dtype=kw["dispatch_dtype"], combine_dtype=kw["combine_dtype"],
                      resident_fraction=kw["resident_fraction"],
                      dispatch_mode=kw["dispatch_mode"], redundant_experts=kw["redundant_experts"],
                      routing="uniform" if getattr(args, "routing", "worst") == "uniform" else "worst")
    return model, system, workload, options


def _check_flag(flag: str, value: float, positive: bool) -> None:
    name = "--" + flag.replace("_", "-")
    if value != value or value in (float("inf"), float("-inf")):
        raise SpecError(f"{name}: must be finite, got {value}")
    if positive and value <= 0:
        raise SpecError(f"{name}: must be > 0, got {value}")
    if value < 0:
        raise SpecError(f"{name}: must be >= 0, got {value}")
