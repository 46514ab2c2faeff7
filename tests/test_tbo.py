"""Two-batch overlap (TBO) of the EP strategy: plan.tbo_step and Plan.micro_batches."""

import pytest

from moelab import api
from moelab.costmodel import plan as planner
from moelab.costmodel.specs import SpecError


def test_tbo_step_by_hand_two_layers():
    # Two layers, both halves' compute 8 s and communication 4 s in all: per micro-batch and
    # layer c = 8 / 4 = 2, m = 4 / 4 = 1. Slots, drawn out:
    #   compute stream: A1 B1 A2 B2          (2 s each)
    #   comm stream:       A1 B1 A2 B2       (1 s each, each after its own compute)
    # A1c 0-2 | B1c 2-4, A1m 2-3 | A2c 4-6 (A1m done), B1m 4-5 | B2c 6-8, A2m 6-7 | B2m 8-9
    assert planner.tbo_step(8.0, 4.0, 2) == pytest.approx(9.0)
    # Communication-bound: c = 1, m = 3 (one layer each of 2 and 6 s): A1c 0-1 | B1c 1-2,
    # A1m 1-4 | B1m 4-7 (waits for the link): 7 s = c + m + max(c, m).
    assert planner.tbo_step(2.0, 6.0, 1) == pytest.approx(7.0)


def _simulate_two_batches(c: float, m: float, layers: int) -> float:
    """Brute force: micro-batches A and B each run compute c then communication m per layer, in
    that order; one compute lane and one communication lane, each serving A then B per layer
    (the alternation SGLang's executor imposes). Each op starts when its lane and its own
    micro-batch's previous op are free."""
    lane = {"compute": 0.0, "comm": 0.0}
    done = {"A": 0.0, "B": 0.0}
    for _ in range(layers):
        for mb in ("A", "B"):
            for kind, t in (("compute", c), ("comm", m)):
                start = max(lane[kind], done[mb])
                lane[kind] = done[mb] = start + t
    return max(done.values())


@pytest.mark.parametrize("c,m,layers", [(2.0, 1.0, 2), (1.0, 3.0, 1), (0.3, 0.3, 61), (1e-4, 0.2, 3),
                                        (0.7, 0.0, 10), (1.7, 0.4, 58), (0.4, 1.7, 58)])
def test_tbo_step_is_the_simulated_schedule(c, m, layers):
    sim = _simulate_two_batches(c, m, layers)
    assert planner.tbo_step(2 * layers * c, 2 * layers * m, layers) == pytest.approx(sim, rel=1e-12)


@pytest.mark.parametrize("compute,comm,layers", [(8.0, 4.0, 2), (2.0, 6.0, 1), (5.0, 5.0, 61),
                                                  (1e-3, 7.0, 3), (3.0, 0.0, 10)])
def test_tbo_step_between_overlap_and_serial(compute, comm, layers):
    step = planner.tbo_step(compute, comm, layers)
    assert max(compute, comm) - 1e-12 <= step <= compute + comm + 1e-12


def _ep(r):
    return next(s for s in r["strategies"] if s["name"] == "ep")


@pytest.mark.parametrize("engine", ["ideal", "sglang"])
@pytest.mark.parametrize("kw", [dict(tokens=16384 * 16, gpus=16, context=4096),
                                dict(decode_batch=128 * 64, gpus=64, context=4096)])
def test_one_micro_batch_is_the_serial_step(engine, kw):
    # micro_batches=1 is the default: the same step as not asking, and the serial sum of its terms
    a = _ep(api.plan("deepseek-v3", "h800-sxm", engine=engine, **kw))
    b = _ep(api.plan("deepseek-v3", "h800-sxm", engine=engine, micro_batches=1, **kw))
    assert a["step_s"] == b["step_s"] and a["terms"] == b["terms"]
    t = a["terms"]
    serial = t["compute_s"] + t["tp_allreduce_s"] + t["ep_latency_s"] + max(t["network_s"], t["nvlink_s"])
    assert a["step_s"] == pytest.approx(serial, rel=1e-12)


@pytest.mark.parametrize("engine", ["ideal", "sglang"])
@pytest.mark.parametrize("kw", [dict(tokens=16384 * 16, gpus=16, context=4096),
                                dict(decode_batch=128 * 64, gpus=64, context=2000)])
def test_two_micro_batches_pipeline_and_bound(engine, kw):
    r = _ep(api.plan("deepseek-v3", "h800-sxm", engine=engine, micro_batches=2, **kw))
    t = r["terms"]
    compute = t["compute_s"] + t["tp_allreduce_s"]
    comm = t["ep_latency_s"] + max(t["network_s"], t["nvlink_s"])
    assert r["micro_batches"] == 2 and "two-batch overlap" in r["reason"]
    assert max(compute, comm) <= r["step_s"] <= compute + comm
    # the pipeline over the 58 MoE layers of DeepSeek-V3, by hand
    c, m = compute / 116, comm / 116
    assert r["step_s"] == pytest.approx(c + m + 115 * max(c, m), rel=1e-12)
    # the bound is the ideal engine's with the same micro-batches, and the prediction is above it
    ideal = _ep(api.plan("deepseek-v3", "h800-sxm", engine="ideal", micro_batches=2, **kw))
    assert r["bound_step_s"] == pytest.approx(ideal["step_s"], rel=1e-12)
    assert r["step_s"] >= r["bound_step_s"] * (1 - 1e-12)


def test_halves_pay_twice_the_latency_and_prefill_loses_deepep_sms():
    kw = dict(tokens=16384 * 16, gpus=16, context=4096, engine="ideal")
    one = _ep(api.plan("deepseek-v3", "h800-sxm", **kw))["terms"]
    two = _ep(api.plan("deepseek-v3", "h800-sxm", micro_batches=2, **kw))["terms"]
    # each micro-batch runs its own dispatch and combine: the latencies twice
    assert two["ep_latency_s"] == pytest.approx(2 * one["ep_latency_s"], rel=1e-12)
    # prefill compute on 108 of 132 SMs: at least 132/108 of the serial compute (halves of a
    # roofline cost no less than the whole; they read the weights once more each)
    assert two["compute_s"] >= one["compute_s"] * 132 / 108 * (1 - 1e-12)


def test_tbo_helps_where_communication_is_long_and_decode_keeps_its_sms():
    # decode, 128 sequences per GPU over 8 nodes: communication is a large part of the step
    kw = dict(decode_batch=128 * 64, gpus=64, context=2000, engine="ideal")
    one = _ep(api.plan("deepseek-v3", "h800-sxm", **kw))
    two = _ep(api.plan("deepseek-v3", "h800-sxm", micro_batches=2, **kw))
    assert two["step_s"] < one["step_s"]


@pytest.mark.parametrize("bad", [0, 3, True, 2.0, "2"])
def test_micro_batches_must_be_1_or_2(bad):
    with pytest.raises(SpecError, match="micro_batches"):
        api.plan("deepseek-v3", "h800-sxm", gpus=16, decode_batch=64, micro_batches=bad)


def test_one_gpu_has_no_overlap_to_gain():
    # one GPU: no dispatch or combine; two halves only cost (weights read twice)
    r = api.plan("qwen3-30b-a3b", "h100-sxm", gpus=1, decode_batch=8, engine="ideal")
    r2 = api.plan("qwen3-30b-a3b", "h100-sxm", gpus=1, decode_batch=8, engine="ideal", micro_batches=2)
    assert _ep(r2)["terms"]["network_s"] == _ep(r2)["terms"]["nvlink_s"] == 0.0
    assert _ep(r2)["step_s"] >= _ep(r)["step_s"]


def test_cli_micro_batches(capsys):
    import json

    from moelab.cli import main

    argv = ["plan", "--model", "deepseek-v3", "--system", "h800-sxm", "--gpus", "64",
            "--decode-batch", "8192", "--engine", "ideal", "--json"]
    assert main([*argv, "--micro-batches", "2"]) == 0
    ep = _ep(json.loads(capsys.readouterr().out))
    assert ep["micro_batches"] == 2
    api_ep = _ep(api.plan("deepseek-v3", "h800-sxm", gpus=64, decode_batch=8192, engine="ideal",
                          micro_batches=2))
    assert ep["step_s"] == api_ep["step_s"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--micro-batches", "3"])
    assert e.value.code == 2 and "--micro-batches" in capsys.readouterr().err
