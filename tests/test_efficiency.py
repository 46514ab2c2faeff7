"""The prediction layer: user profiles, engine efficiencies, prediction >= roofline."""

import json
from dataclasses import replace

import pytest

from moelab.cli import main
from moelab.costmodel import plan as planner
from moelab.costmodel.predict.profile import load_profile
from moelab.costmodel.presets import load_cpu, load_model, load_system, model_config
from moelab.costmodel.specs import SpecError


def make_plan(model="deepseek-r1", system="h100-sxm", **kw):
    spec = load_model(model)
    args = dict(model=spec, cfg=model_config(model), system=load_system(system, latencies=True),
                cpu=load_cpu("xeon-8470"), gpus=1, gpus_per_node=8, tokens=64, sequences=64,
                context=4096, decode=True,
                routing=planner.make_routing("uniform", spec.n_moe_layers, spec.n_experts, spec.top_k),
                host_mem=2e12)
    args.update(kw)
    return planner.Plan(**args)


def profile(**kw):
    return {"moelab_profile": 1, "engine": "ideal", **kw}


# --- the user profile -------------------------------------------------------------------


def test_profile_scale_doubles_the_offload_compute_term():
    p = make_plan()
    plain = planner.plan_offload(p)
    scaled = planner.plan_offload(replace(p, profile=load_profile(profile(scale={"compute_s": 2.0}))))
    c, s = plain["terms"]["compute_s"], plain["terms"]["stream_s"]
    assert plain["feasible"] and c > 0 and s > 0
    assert scaled["terms"]["compute_s"] == pytest.approx(2 * c, rel=1e-12)
    assert scaled["terms"]["stream_s"] == pytest.approx(s, rel=1e-12)
    # offload's step is the sum of its terms: 2c + s, its overlap the larger
    assert scaled["step_s"] == pytest.approx(2 * c + s, rel=1e-12)
    assert scaled["step_overlap_s"] == pytest.approx(max(2 * c, s), rel=1e-12)


def test_profile_fixed_costs_add_per_step_and_per_layer():
    p = make_plan(system="h200-sxm")
    layers = load_model("deepseek-r1").n_layers  # 61 in DeepSeek-R1's config.json
    assert layers == 61
    plain = planner.plan_ep(replace(p, gpus=8))
    fixed = planner.plan_ep(replace(p, gpus=8, profile=load_profile(
        profile(fixed={"per_step_s": 1e-3, "per_layer_s": 2e-5}))))
    assert fixed["step_s"] - plain["step_s"] == pytest.approx(1e-3 + 61 * 2e-5, rel=1e-9)
    assert fixed["terms"] == plain["terms"]


def test_profile_scales_terms_before_the_max():
    # EP combines its legs by a max: scaling the slower leg's rival above it changes the step
    # by the new max, not by the factor
    p = replace(make_plan(system="h200-sxm"), gpus=16, gpus_per_node=8)
    plain = planner.plan_ep(p)
    t = plain["terms"]
    assert t["network_s"] > t["nvlink_s"] > 0
    k = 3 * t["network_s"] / t["nvlink_s"]
    scaled = planner.plan_ep(replace(p, profile=load_profile(profile(scale={"nvlink_s": k}))))
    expect = t["compute_s"] + t["tp_allreduce_s"] + t["ep_latency_s"] + k * t["nvlink_s"]
    assert scaled["step_s"] == pytest.approx(expect, rel=1e-12)


def test_profile_reads_from_a_file_and_the_cli(tmp_path, capsys):
    f = tmp_path / "prof.json"
    f.write_text(json.dumps(profile(engine="vllm", scale={"compute_s": 1.5}, source="test")))
    assert load_profile(str(f)).factor("compute_s") == 1.5
    assert main(["plan", "--gpus", "1", "--decode-batch", "4", "--profile", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == "vllm" and out["profile"]["scale"] == {"compute_s": 1.5}


@pytest.mark.parametrize("bad, words", [
    ({"engine": "ideal"}, "not a moelab profile"),
    (profile(engine="tensorflow"), "engine must be one of"),
    (profile(scale={"compute": 2.0}), "unknown term 'compute'"),
    (profile(scale={"compute_s": 0}), "> 0"),
    (profile(scale={"compute_s": float("nan")}), "finite"),
    (profile(fixed={"per_step_s": -1.0}), ">= 0"),
    (profile(fixed={"per_token_s": 1.0}), "unknown key 'per_token_s'"),
    (profile(extra=1), "unknown key 'extra'"),
    ([1, 2], "a path or a JSON object"),
])
def test_bad_profiles_give_one_line(bad, words):
    with pytest.raises(SpecError, match=words) as e:
        load_profile(bad)
    assert "\n" not in str(e.value)


def test_bad_profile_file_exits_2(tmp_path, capsys):
    f = tmp_path / "prof.json"
    f.write_text("{\"moelab_profile\": 1, ")
    assert main(["plan", "--profile", str(f)]) == 2
    err = capsys.readouterr().err
    assert "profile" in err and str(f) in err and len(err.strip().splitlines()) == 1
