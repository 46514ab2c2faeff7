"""`moelab offload`: run expert offload for real and check the bytes it copied against the model.

The counterpart of `moelab ep`. A stack of L MoE layers, shrunk the way `ep` shrinks it
(E, k and the routing kept; d and the expert intermediate size set by flags):
- every routed expert lives in the host store (`HostExpertStore`, pinned on a GPU);
- per layer: the routing's metadata (`dispatch`, Triton), its used experts reach the
  device cache through the prefetcher (copy engine or Triton gather; on a CPU the
  worker-thread stand-in), then the rows are scattered, each used expert's gated MLP runs
  on its rows, and `combine` sums them back per token;
- each layer's output is checked against a dense reference (every token through its k
  experts, weights read from the host store, in float64) on the same input.

The model's bytes are computed apart from the prefetcher's counters: the used experts of
each layer come from the routing ids themselves (not from dispatch's counts), the cache
hits from a plain LRU over the (layer, expert) sequence written here, and

    bytes_copied_model = sum over passes and layers of |used experts| x expert bytes
                         - cache hits x expert bytes.

`--passes P` runs the stack P times on fresh tokens (decode steps, prefill chunks): with
enough slots (`--slots`) the later passes hit. On a GPU the copies are also timed (the
layers' transfers alone, synchronized) against the model's time at B_pcie of `--system`
(the file `moelab calibrate` writes, or a preset).
"""

from __future__ import annotations

import os

HELP = "execute an offloaded MoE layer stack (host store -> device cache) and check its bytes"


def add_arguments(p):
    p.add_argument("--model", default="deepseek-r1", help="preset or config.json [deepseek-r1]")
    p.add_argument("--tokens", type=int, default=256, metavar="N_t", help="tokens per pass [256]")
    p.add_argument("--layers", type=int, default=4, metavar="L", help="MoE layers run [4]")
    p.add_argument("--passes", type=int, default=1, metavar="P",
                   help="times the stack runs, on fresh tokens each time [1]")
    p.add_argument("--slots", type=int, metavar="C",
                   help="device cache slots [the most experts one layer uses]")
    p.add_argument("--routing", default="uniform",
                   help="uniform | zipf:S | dirichlet:A | groups | logits:F.npy | hist:F [uniform]")
    p.add_argument("--path", choices=("copy", "gather"), default="copy",
                   help="transfer: copy engine or Triton gather kernel [copy]")
    p.add_argument("--hidden", type=int, default=64, metavar="d", help="hidden size run [64]")
    p.add_argument("--intermediate", type=int, default=128, metavar="I",
                   help="expert intermediate size run [128]")
    p.add_argument("--system", default="h100-sxm",
                   help="system preset or file (moelab calibrate --out) for B_pcie [h100-sxm]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON (SI units)")


# the expert dtypes a GEMM can read here (4-bit block formats are stored as raw bytes)
_COMPUTABLE = ("fp32", "bf16", "fp16", "fp8")


def _check(args):
    from moelab.costmodel.specs import SpecError

    for name in ("tokens", "layers", "passes", "hidden", "intermediate"):
        v = getattr(args, name)
        if v < 1:
            raise SpecError(f"--{name}: must be >= 1, got {v}")
    if args.slots is not None and args.slots < 1:
        raise SpecError(f"--slots: must be >= 1, got {args.slots}")


def lru_hits(steps, n_slots: int) -> int:
    """Hits of an LRU cache of n_slots over the (layer, expert) keys of `steps` (lists of
    keys in access order, one list per layer run). Written apart from ExpertCache so that
    the model does not count with the code it checks."""
    from collections import OrderedDict

    resident: OrderedDict = OrderedDict()
    hits = 0
    for keys in steps:
        for key in keys:
            if key in resident:
                hits += 1
                resident.move_to_end(key)
            else:
                if len(resident) == n_slots:
                    resident.popitem(last=False)
                resident[key] = None
    return hits


def _routing(args, model, n_runs):
    """[n_runs] int32 tensors [N_t, k]: the routing of each (pass, layer), as `moelab ep`
    draws it (the same generator, one key per run)."""
    import jax
    import numpy as np
    import torch

    from moelab.costmodel import routing as rt
    from moelab.costmodel.specs import parse_routing

    gen = rt.layer_generator(parse_routing(args.routing), 1, args.tokens, model.n_experts,
                             model.top_k, model.n_group, model.topk_group)  # fmt: skip
    key = jax.random.key(args.seed)
    return [torch.from_numpy(np.asarray(gen(jax.random.fold_in(key, r), 0)).astype(np.int32))
            for r in range(n_runs)]  # fmt: skip


def _mlp(x, w, d, inter, gated):
    """The expert's MLP on rows x (float): silu(x Wg^T) * (x Wu^T) Wd^T, scaled so that
    outputs stay O(1) whatever the random weights: fan-in 1/sqrt."""
    import torch

    up = x @ w["up"].to(x.dtype).T / d**0.5
    h = torch.nn.functional.silu(x @ w["gate"].to(x.dtype).T / d**0.5) * up if gated else torch.relu(up)
    return h @ w["down"].to(x.dtype).T / inter**0.5


def compute(args) -> dict:
    import time

    import torch

    from moelab.costmodel.presets import load_model, load_system
    from moelab.costmodel.specs import SpecError

    _check(args)
    cuda = torch.cuda.is_available()
    if not cuda:  # the Triton kernels run in the interpreter without a GPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from moelab.kernels.combine import combine
    from moelab.kernels.dispatch import dispatch, used_experts, validate
    from moelab.kernels.expert_store import HostExpertStore
    from moelab.kernels.prefetch import Prefetcher

    model = load_model(args.model)
    system = load_system(args.system)
    if model.expert_dtype not in _COMPUTABLE:
        raise SpecError(f"--model: expert dtype {model.expert_dtype} is stored as raw bytes "
                        f"here; offload runs {', '.join(_COMPUTABLE)} experts")  # fmt: skip
    E, k, N, L, d, inter = (model.n_experts, model.top_k, args.tokens, args.layers,
                            args.hidden, args.intermediate)  # fmt: skip
    dev = torch.device("cuda" if cuda else "cpu")
    runs = [(p, layer) for p in range(args.passes) for layer in range(L)]
    ids_of = _routing(args, model, len(runs))
    # used experts from the ids themselves (the model's side, not dispatch's counts)
    used_of = [sorted({int(e) for e in ids.flatten().tolist() if e >= 0}) for ids in ids_of]
    slots = args.slots or max(len(u) for u in used_of)
    if slots < max(len(u) for u in used_of):
        raise SpecError(f"--slots: a layer uses {max(len(u) for u in used_of)} experts at once, "
                        f"more than {slots} slots")  # fmt: skip

    store = HostExpertStore(model, layers=L, hidden=d, intermediate=inter, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    max_err = max_out = 0.0
    t_layers = 0.0
    with Prefetcher(store, slots, device=dev, path=args.path) as pf:
        for (_, layer), ids in zip(runs, ids_of, strict=True):
            if layer == 0:  # a fresh batch of tokens for each pass
                x = torch.randn(N, d, generator=g)
            logits = torch.randn(N, k, generator=g)
            w = torch.softmax(logits, dim=-1)
            x_dev, ids_dev, w_dev = x.to(dev), ids.to(dev), w.to(dev)
            t0 = time.perf_counter()
            lay = dispatch(x_dev, ids_dev, E, 16)
            fetch = pf.fetch(layer, used_experts(lay))  # copies issued on the transfer lane
            y = torch.zeros(lay.n_pad, d, device=dev)
            offsets, counts = lay.offsets.tolist(), lay.counts.tolist()
            for e in fetch.experts:  # each GEMM waits for its own expert's copy only
                rows = slice(offsets[e], offsets[e] + counts[e])
                y[rows] = _mlp(lay.hidden[rows].float(), fetch.weights(e), d, inter, model.gated)
            fetch.release()
            out = combine(y, lay, w_dev, torch.float32)
            validate(lay)
            if cuda:
                torch.cuda.synchronize()
            t_layers += time.perf_counter() - t0
            want = _dense_reference(x, ids, w, store, layer, d, inter, model.gated)
            max_err = max(max_err, float((out.cpu().double() - want).abs().max()))
            max_out = max(max_out, float(want.abs().max()))
            # the next layer's input: the output, RMS-normalized (random weights would
            # otherwise grow or shrink it layer after layer)
            x = out.cpu() / out.cpu().pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
        pf.synchronize()
        stats = pf.stats()
        transfer = pf.lanes.name
        gather_route = pf.gather_route

    steps = [[(layer, e) for e in used] for (_, layer), used in zip(runs, used_of, strict=True)]
    hits_model = lru_hits(steps, slots)
    used_total = sum(len(u) for u in used_of)
    expert_bytes = store.block_bytes  # what one copy moves: the expert, 256-B aligned
    bytes_model = (used_total - hits_model) * expert_bytes
    out = {
        "model": model.name, "tokens": N, "layers": L, "passes": args.passes,
        "n_experts": E, "top_k": k, "routing": args.routing,
        "hidden_run": d, "intermediate_run": inter, "expert_dtype": model.expert_dtype,
        "expert_bytes_run": store.expert_bytes, "block_bytes": store.block_bytes,
        "slots": slots, "path": args.path, "transfer": transfer,
        "transfer_stand_in": not cuda,
        "kernels": "compiled" if cuda else "triton interpreter",
        "gather_route": gather_route,
        "used_experts_per_layer": [len(u) for u in used_of],
        "cache_hits_model": hits_model, "cache_hits_measured": stats["hits"],
        "copies_measured": stats["copies"],
        "bytes_copied_measured": stats["bytes_copied"], "bytes_copied_model": bytes_model,
        "bytes_match": stats["bytes_copied"] == bytes_model,
        "bytes_full_size_model": round((used_total - hits_model) * model.expert_bytes),
        "max_abs_err": max_err, "max_abs_out": max_out,
        "layers_seconds": t_layers,
        "system": system.name, "b_pcie": system.b_pcie, "alpha_pcie": system.alpha_pcie,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }  # fmt: skip
    out.update(_copy_timing(store, runs, used_of, slots, args.path, dev, system, cuda,
                            copies=used_total - hits_model))  # fmt: skip
    return out


def _dense_reference(x, ids, w, store, layer, d, inter, gated):
    """[N_t, d] float64: sum_j w[t, j] * expert_{ids[t, j]}(x_t), weights from the host store."""
    import torch

    xd = x.double()
    out = torch.zeros_like(xd)
    for e in sorted({int(v) for v in ids.flatten().tolist() if v >= 0}):
        weights = store.views(store.block(layer, e))
        mask = ids == e  # [N_t, k]
        tok = mask.any(1)
        gate = (w.double() * mask).sum(1)[tok]
        out[tok] += gate[:, None] * _mlp(xd[tok], weights, d, inter, gated)
    return out


def _copy_timing(store, runs, used_of, slots, path, dev, system, cuda, copies: int) -> dict:
    """On a GPU: the layers' transfers alone, timed (a fresh cache, synchronized), against
    the model's time bytes / B_pcie + copies x alpha_pcie. Off a GPU: the model's time only
    (the worker-thread stand-in moves host memory, not a host link)."""
    import time

    from moelab.kernels.prefetch import Prefetcher

    model_s = copies * store.block_bytes / system.b_pcie + copies * system.alpha_pcie
    out = {"copy_time_model_s": model_s, "copy_time_s": None, "copy_time_ratio": None}
    if not cuda:
        out["copy_time_note"] = "no GPU: the copies ran on the CPU stand-in, not timed"
        return out
    import torch

    with Prefetcher(store, slots, device=dev, path=path) as pf:  # warm-up: first launches
        f = pf.fetch(0, used_of[0])
        f.release()
        pf.synchronize()
    with Prefetcher(store, slots, device=dev, path=path) as pf:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for (_, layer), used in zip(runs, used_of, strict=True):
            pf.fetch(layer, used).release()
        pf.synchronize()
        out["copy_time_s"] = time.perf_counter() - t0
        out["copies_timed"] = pf.copies
    if out["copies_timed"] != copies:  # the model's time would be for other copies
        out["copy_time_note"] = f"{out['copies_timed']} copies timed, the model has {copies}"
    out["copy_time_ratio"] = out["copy_time_s"] / model_s  # 1.0: the model's B_pcie held
    return out


def run(args) -> int:
    import json

    out = compute(args)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"offload: {out['model']} (E={out['n_experts']}, k={out['top_k']}), {out['layers']} layers x "
          f"{out['passes']} passes of {out['tokens']} tokens, d={out['hidden_run']}, "
          f"I={out['intermediate_run']}, {out['expert_dtype']} experts, routing {out['routing']}")
    where = ("CPU: a worker thread stands in for the transfer stream, Triton interpreter"
             if out["transfer_stand_in"] else f"{out['device']}: {out['transfer']}")
    print(f"  transfers: {out['path']} path on {where}; {out['slots']} cache slots")
    print(f"  max |out - dense reference| = {out['max_abs_err']:.3g} "
          f"(outputs up to {out['max_abs_out']:.3g})")
    print(f"  copied {out['bytes_copied_measured']:,} B in {out['copies_measured']} copies, model "
          f"{out['bytes_copied_model']:,} B ({out['cache_hits_model']} cache hits): "
          f"{'equal' if out['bytes_match'] else 'DIFFERENT'}")
    if out["copy_time_s"] is not None:
        print(f"  copy time {out['copy_time_s'] * 1e3:.3f} ms, model {out['copy_time_model_s'] * 1e3:.3f} ms "
              f"at B_pcie {out['b_pcie'] / 1e9:.1f} GB/s ({out['system']}): x{out['copy_time_ratio']:.2f}")
    else:
        print(f"  copy time: {out['copy_time_note']} (model {out['copy_time_model_s'] * 1e3:.3f} ms "
              f"at B_pcie {out['b_pcie'] / 1e9:.1f} GB/s)")
    return 0
