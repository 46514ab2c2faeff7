"""`plan --phase both`: prefill and decode, each its strategy, joined per request (costmodel/phases.py)."""

from __future__ import annotations

import math

import pytest

import moelab
from moelab.cli import main
from moelab.costmodel import memory
from moelab.costmodel.presets import load_model, model_config

QWEN = "qwen3-30b-a3b"
# Qwen3-30B-A3B's KV cache per token at bf16, from its config.json: 48 layers x (K and V) x
# 4 KV heads x head_dim 128 x 2 B.
QWEN_KV_PER_TOKEN = 48 * 2 * 4 * 128 * 2
H100_USABLE = 0.9 * 80e9  # 0.9 x the H100's 80 GB


def option(r, kind, prefill, decode=None):
    return next(o for o in r.combined["options"]
                if o["kind"] == kind and o.get("prefill", {}).get("name") == prefill
                and o.get("decode", {}).get("name") == (decode or prefill))


def ranked(r, phase, name):
    return next(s for s in r.phases[phase]["strategies"] if s["name"] == name)


def test_request_time_and_throughput_by_hand_from_the_two_single_phase_plans():
    # Qwen3-30B-A3B fits one H100: ep (all experts on the GPU) for both phases. Prompts of
    # 4096 tokens prefilled in chunks of 1024 (4 passes), 300 output tokens, decode batch 8.
    P, O, B, N = 4096, 300, 8, 1024
    r = moelab.plan(QWEN, gpus=1, engine="vllm", phase="both", prompt=P, output=O, decode_batch=B, tokens=N)
    pre = moelab.plan(QWEN, gpus=1, engine="vllm", tokens=N, context=P)
    dec = moelab.plan(QWEN, gpus=1, engine="vllm", decode_batch=B, context=P + O // 2)
    t_p = next(s["step_s"] for s in pre.strategies if s["name"] == "ep")
    t_d = next(s["step_s"] for s in dec.strategies if s["name"] == "ep")
    # the phases' rankings are those single-phase plans
    assert ranked(r, "prefill", "ep")["step_s"] == t_p and ranked(r, "decode", "ep")["step_s"] == t_d
    same = option(r, "same", "ep")
    assert same["feasible"] and same["gpus"] == 1
    assert same["prefill"]["step_s"] == pytest.approx(t_p, rel=1e-12)
    assert same["decode"]["step_s"] == pytest.approx(t_d, rel=1e-12)
    assert same["request_s"] == pytest.approx(4 * t_p + O * t_d, rel=1e-12)
    # and its decode waits while the GPU prefills its B batch-mates' successors, 4 passes each
    assert same["decode_stall_s"] == pytest.approx(B * 4 * t_p, rel=1e-12)
    # GPU-seconds per request: a quarter of each of 4 passes' worth of prompt... i.e. P/N
    # passes, and 1/B of each of O decode steps (B requests share a step)
    gpu_s = t_p * P / N + t_d * O / B
    assert same["gpu_s_per_request"] == pytest.approx(gpu_s, rel=1e-12)
    assert same["output_tokens_per_s_per_gpu"] == pytest.approx(O / gpu_s, rel=1e-12)
    assert same["tokens_per_s_per_gpu"] == pytest.approx((P + O) / gpu_s, rel=1e-12)
    # the same phase plans through phase="prefill" and phase="decode"
    only_pre = moelab.plan(QWEN, gpus=1, engine="vllm", phase="prefill", prompt=P, tokens=N)
    only_dec = moelab.plan(QWEN, gpus=1, engine="vllm", phase="decode", prompt=P, output=O, decode_batch=B)
    assert [s["step_s"] for s in only_pre.strategies] == [s["step_s"] for s in pre.strategies]
    assert [s["step_s"] for s in only_dec.strategies] == [s["step_s"] for s in dec.strategies]


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_best_per_phase_choice_beats_or_equals_the_best_single_strategy(gpus):
    r = moelab.plan(QWEN, gpus=gpus, engine="vllm", phase="both", prompt=2048, output=256, decode_batch=16)
    c = r.combined
    feasible = [o for o in c["options"] if o["feasible"]]
    same = [o for o in feasible if o["kind"] == "same"]
    tps = "output_tokens_per_s_per_gpu"
    assert c["best_single"][tps] == max(o[tps] for o in same)
    assert c["best"][tps] == max(o[tps] for o in feasible)
    assert c["best"][tps] >= c["best_single"][tps]
    for o in feasible:  # every option's throughput is its GPU-seconds per request's
        assert o["output_tokens_per_s_per_gpu"] == pytest.approx(256 / o["gpu_s_per_request"], rel=1e-12)
        assert o["request_s"] == pytest.approx(o["prefill_s"] + o["kv_transfer_s"] + o["decode_s"], rel=1e-12)
        for phase in ("prefill", "decode"):  # the roofline beside each phase's prediction
            assert o[phase]["bound_step_s"] <= o[phase]["step_s"] * (1 + 1e-12)


def test_deepseek_r1_on_one_gpu_prefills_layerwise_on_the_gpu_and_decodes_on_the_cpu():
    # KTransformers on one H100 with a 1 TB host: a 32k-token prompt's experts stream to the
    # GPU layer by layer (the CPU's matrix units would take longer); decode computes them on
    # the CPU. A 1k-token prompt keeps them on the CPU: the switch depends on the prompt.
    kw = dict(gpus=1, engine="ktransformers", host_mem=1e12, phase="both", output=512, decode_batch=1)
    r = moelab.plan("deepseek-r1", prompt=32768, **kw)
    pre = ranked(r, "prefill", r.phases["prefill"]["best"])
    dec = ranked(r, "decode", r.phases["decode"]["best"])
    assert pre["name"] in ("hybrid", "cpu-experts") and pre["terms"].get("stream_s", 0) > 0
    assert pre["terms"]["cpu_s"] == 0
    assert dec["terms"]["cpu_s"] > 0 and "stream_s" not in dec["terms"]
    best = r.combined["best"]
    assert "layerwise" in best["prefill"]["mode"] and "CPU" in best["decode"]["mode"]
    # both memories at once: the decode planned with the prefill's staging and KV off its HBM
    assert best["memory"]["gpu_each_needed"] <= best["memory"]["gpu_each_available"]
    short = moelab.plan("deepseek-r1", prompt=1024, **kw)
    assert "stream_s" not in ranked(short, "prefill", short.phases["prefill"]["best"])["terms"]


def test_one_deployment_holds_both_phases_memory_at_once():
    # ep on one H100: weights W + the decode batch's KV + the prefill pass's KV <= 0.9 x 80 GB.
    P, O = 4096, 512
    cfg, m = model_config(QWEN), load_model(QWEN)
    W = memory.weights_bytes(cfg, m)
    kv_d, kv_p = (P + O // 2) * QWEN_KV_PER_TOKEN, P * QWEN_KV_PER_TOKEN
    assert memory.kv_bytes(cfg, P, "bf16") == kv_p
    b_max = math.floor((H100_USABLE - W) / kv_d)  # the largest decode batch that fits alone
    kw = dict(gpus=1, engine="ideal", phase="both", prompt=P, output=O)
    fits = option(moelab.plan(QWEN, decode_batch=b_max - 1, **kw), "same", "ep")
    assert fits["feasible"]  # slack >= one sequence at P + O/2 > the prefill's one at P
    assert fits["memory"]["gpu_each_needed"] == pytest.approx(W + (b_max - 1) * kv_d + kv_p, rel=1e-12)
    # four prompts per prefill pass: each phase alone fits, together they do not
    r = moelab.plan(QWEN, decode_batch=b_max - 1, tokens=4 * P, **kw)
    assert ranked(r, "prefill", "ep")["feasible"] and ranked(r, "decode", "ep")["feasible"]
    assert W + (b_max - 1) * kv_d + 4 * kv_p > H100_USABLE
    same = option(r, "same", "ep")
    assert not same["feasible"] and "both phases at once" in same["reason"]


def test_disaggregated_pools_pay_the_kv_transfer():
    P, O, B = 2048, 256, 16
    r = moelab.plan(QWEN, gpus=2, engine="vllm", phase="both", prompt=P, output=O, decode_batch=B)
    d = next(o for o in r.combined["options"] if o["kind"] == "disaggregated")
    assert d["feasible"] and d["prefill"]["pool_gpus"] + d["decode"]["pool_gpus"] == 2
    kv = P * QWEN_KV_PER_TOKEN
    assert d["kv_bytes_per_request"] == kv and d["decode_stall_s"] == 0
    assert d["kv_transfer_s"] == pytest.approx(r.system["alpha_net_s"] + kv / r.system["b_net"], rel=1e-12)
    # one GPU each: the slower pool sets the request rate (the network carries far more)
    rate = min(d["prefill"]["tokens_per_s_per_gpu"] / P, d["decode"]["tokens_per_s_per_gpu"] / O,
               r.system["b_net"] / kv)
    assert d["output_tokens_per_s_per_gpu"] == pytest.approx(rate * O / 2, rel=1e-12)
    by_hand = d["prefill"]["step_s"] + d["kv_transfer_s"] + O * d["decode"]["step_s"]
    assert d["request_s"] == pytest.approx(by_hand, rel=1e-12)
    one = moelab.plan(QWEN, gpus=1, engine="vllm", phase="both", prompt=P, output=O, decode_batch=B)
    d1 = next(o for o in one.combined["options"] if o["kind"] == "disaggregated")
    assert not d1["feasible"] and "2 GPUs" in d1["reason"]


def test_the_table_shows_each_phase(capsys):
    assert main(["plan", "--model", QWEN, "--gpus", "1", "--engine", "vllm", "--phase", "both",
                 "--prompt", "2048", "--output", "128", "--decode-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "prefill alone: " in out and "decode alone: " in out and "best single strategy" in out
    assert "roofline" in out and "per GPU" in out


@pytest.mark.parametrize("argv, flag", [
    (["--prompt", "4096"], "--prompt"),
    (["--output", "100"], "--output"),
    (["--phase", "both"], "--output"),
    (["--phase", "both", "--output", "10", "--context", "100"], "--context"),
    (["--phase", "decode", "--output", "10", "--tokens", "100"], "--tokens"),
    (["--phase", "prefill", "--output", "10"], "--phase"),
    (["--phase", "both", "--output", "0"], "--output"),
    (["--phase", "both", "--output", "10", "--prompt", "-5"], "--prompt"),
    (["--phase", "both", "--output", "10", "--slo-ms", "50"], "--slo-ms"),
    (["--phase", "both", "--output", "10", "--emit", "vllm"], "--emit"),
])
def test_bad_phase_flags_one_line_exit_2(argv, flag, capsys):
    assert main(["plan", "--model", QWEN, "--gpus", "1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].partition("error: ")[2].startswith(flag), err


def test_every_json_key_of_phase_both_is_in_the_contracts(capsys):
    # as tests/test_docs.py does for the single-phase runs: each key, at any depth, in backticks
    import json
    import re
    from pathlib import Path

    contracts = (Path(__file__).parents[1] / "docs" / "contracts.md").read_text()
    documented = set(re.findall(r"`([\w]+)`", contracts))

    def keys(x):
        if isinstance(x, dict):
            return set(x) | {k for v in x.values() for k in keys(v)}
        return keys(x[0]) if isinstance(x, list) and x else set()

    assert main(["plan", "--json", "--model", QWEN, "--gpus", "2", "--engine", "vllm", "--phase", "both",
                 "--prompt", "2048", "--output", "128", "--decode-batch", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {o["kind"] for o in out["combined"]["options"] if o["feasible"]} >= {"same", "disaggregated"}
    assert not keys(out) - documented, sorted(keys(out) - documented)
