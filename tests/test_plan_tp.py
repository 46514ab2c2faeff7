"""The `tp` strategy (expert tensor parallelism): agreement with EP on one GPU, its all-reduce by hand."""

from dataclasses import replace

import pytest

from moelab.costmodel import memory
from moelab.costmodel import plan as planner
from moelab.costmodel.presets import load_cpu, load_model, load_system, model_config


def make_plan(model="qwen3-30b-a3b", gpus=1, tokens=4, decode=True, context=1024, **kw):
    spec = load_model(model)
    args = dict(model=spec, cfg=model_config(model), system=load_system("h100-sxm", latencies=True),
                cpu=load_cpu("xeon-8470"), gpus=gpus, gpus_per_node=8, tokens=tokens,
                sequences=tokens if decode else 1, context=context, decode=decode,
                routing=planner.make_routing("uniform", spec.n_moe_layers, spec.n_experts, spec.top_k),
                host_mem=2e12)
    args.update(kw)
    return planner.Plan(**args)


@pytest.mark.parametrize("decode,tokens,context", [(True, 1, 1024), (True, 32, 2048), (False, 2048, 2048)])
def test_one_gpu_tp_and_ep_are_the_same_deployment(decode, tokens, context):
    # On one GPU, sharding experts by columns over 1 GPU and placing E/1 experts per GPU are
    # both "everything on the GPU": no collective, same weights, same KV, same work.
    p = make_plan(decode=decode, tokens=tokens, context=context)
    tp, ep = planner.plan_tp(p), planner.plan_ep(p)
    assert tp["feasible"] and ep["feasible"]
    assert tp["step_s"] == pytest.approx(ep["step_s"], rel=1e-12)
    assert tp["memory"]["gpu_each"]["needed"] == pytest.approx(ep["memory"]["gpu_each"]["needed"], rel=1e-12)
    assert tp["terms"]["tp_allreduce_s"] == 0.0 and ep["ep_comm_s"] == 0.0
    # and the memory is the whole model plus the batch's KV, counted from the config
    cfg = model_config("qwen3-30b-a3b")
    whole = memory.weights_bytes(cfg, p.model) + p.sequences * memory.kv_bytes(cfg, context, "bf16")
    assert tp["memory"]["gpu_each"]["needed"] == pytest.approx(whole, rel=1e-12)


def test_all_reduce_term_by_hand():
    # 2 GPUs, decode batch 4, NVLink 100 GB/s and 10 µs per all-reduce (round numbers).
    p = make_plan(gpus=2, tokens=4, b_scale_up=100e9, alpha_scale_up=10e-6)
    m = p.model
    hidden, layers, moe_layers = 2048, 48, 48  # Qwen3-30B-A3B's config.json
    assert (m.hidden, m.n_layers or m.n_moe_layers, m.n_moe_layers) == (hidden, layers, moe_layers)
    ring = 2 * (2 - 1) / 2 * 4 * hidden * 2 / 100e9  # one ring all-reduce of 4 bf16 rows: 164 ns
    assert ring == pytest.approx(163.84e-9)
    by_mode = {"tensor-parallel attention": 2 * layers * (10e-6 + ring),  # after o_proj and after the MoE
               "data-parallel attention": moe_layers * (2 * 10e-6 + ring)}  # gather + scatter
    r = planner.plan_tp(p)
    assert r["feasible"]
    assert r["terms"]["tp_allreduce_s"] == pytest.approx(by_mode[r["attention"]], rel=1e-12)
    assert r["step_s"] == pytest.approx(r["terms"]["compute_s"] + r["terms"]["tp_allreduce_s"], rel=1e-12)


def test_memory_is_a_share_of_every_expert():
    p = make_plan(gpus=4, tokens=8)
    r = planner.plan_tp(p)
    each = r["memory"]["gpu_each"]
    assert each["experts"] == pytest.approx(memory.expert_weights_bytes(p.model) / 4, rel=1e-12)
    non_expert = memory.weights_bytes(p.cfg, p.model) - memory.expert_weights_bytes(p.model)
    split = 4 if r["attention"] == "tensor-parallel attention" else 1
    assert each["non_expert"] == pytest.approx(non_expert / split, rel=1e-12)


def test_does_not_fit_and_spanning_nodes_are_infeasible_with_figures():
    big = make_plan(model="deepseek-r1", gpus=4, tokens=8)  # 671B parameters on 4 x 80 GB
    r = planner.plan_tp(big)
    assert not r["feasible"] and "does not fit" in r["reason"] and r["step_s"] is None
    assert r["memory"]["gpu_each"]["needed"] > r["memory"]["gpu_each"]["available"]
    wide = planner.plan_tp(replace(big, gpus=16))
    assert not wide["feasible"] and "spans nodes of 8" in wide["reason"]


def test_tp_is_ranked_among_the_strategies():
    out = planner.plan_all(make_plan(gpus=2, tokens=16))
    assert {s["name"] for s in out["strategies"]} == set(planner.STRATEGIES)
    assert "tp" in planner.STRATEGIES
