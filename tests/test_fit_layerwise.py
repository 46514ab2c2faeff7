"""`moelab fit` on a prefill the planner predicts as a layerwise prefill (the CPU's experts
streamed to the GPU layer by layer: the `stream_s` term of cpu-experts and the hybrid)."""

import json
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.costmodel import fit as F

DATA = Path(__file__).parent / "data" / "fit"

HW = ["--system", "h100-sxm", "--cpu", "epyc-9654", "--model", "qwen3-30b-a3b"]


@pytest.mark.parametrize("scale", [None, {"stream_s": 0.3, "compute_s": 2.0, "gpu_experts_s": 1.5}])
def test_combine_is_the_planners_for_a_layerwise_prefill(scale):
    import moelab

    prof = None if scale is None else {"moelab_profile": 1, "engine": "llama.cpp", "scale": scale,
                                       "fixed": {"per_step_s": 0.0, "per_layer_s": 0.0}}
    kw = dict(gpus=1, cpu="epyc-9654", tokens=512, engine="llama.cpp")
    base = next(s for s in moelab.plan("qwen3-30b-a3b", "h100-sxm", **kw)["strategies"]
                if s["name"] == "cpu-experts")
    got = next(s for s in moelab.plan("qwen3-30b-a3b", "h100-sxm", profile=prof, **kw)["strategies"]
               if s["name"] == "cpu-experts")
    assert base["terms"]["stream_s"] > base["terms"]["gpu_experts_s"] > 0  # streamed, layer by layer
    assert F.apply_profile("cpu-experts", base["terms"], 48, prof) == pytest.approx(got["step_s"], rel=1e-12)


def test_a_streamed_prefill_fits_its_stream_factor(tmp_path, capsys):
    # llama-bench.json's first test: pp512 with every MoE layer's experts on the CPU, avg_ns 4e8
    (tmp_path / "pp.json").write_text(json.dumps(json.loads((DATA / "llama-bench.json").read_text())[:1]))
    assert main(["fit", str(tmp_path / "pp.json"), *HW, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (run,) = out["runs"]
    t, measured = run["terms"], 0.4
    assert run["measured_s"] == measured and run["informs"] == ["stream_s"]
    # By hand: compute + max(gpu_experts, stream x s) = measured, the stream being the larger
    s = (measured - t["compute_s"]) / t["stream_s"]
    assert t["stream_s"] * s > t["gpu_experts_s"]
    assert out["profile"]["scale"]["stream_s"] == pytest.approx(s, rel=1e-6)
    assert run["fitted_s"] == pytest.approx(measured, rel=1e-6)
