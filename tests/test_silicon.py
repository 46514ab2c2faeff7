"""The silicon-sample validation: the extraction's filter, the row mapping, the statistics, a small run."""

import importlib.util
import json
from pathlib import Path

import pytest

from moelab.experiments import exp_silicon as ex
from moelab.experiments import runner

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("id,silicon_data_source,backend,backend_version,model_path,system,precision,mode,isl,osl,"
          "gemm_quant_mode,moe_quant_mode,batch_size,tp_size,pp_size,attention_dp_size,moe_tp_size,"
          "moe_ep_size,silicon_ttft_ms,silicon_tpot_ms")


def _extractor():
    path = ROOT / "experiments/data/extract_silicon.py"
    spec = importlib.util.spec_from_file_location("extract_silicon", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_extraction_keeps_aggregated_rows_of_preset_models_on_preset_gpus():
    pytest.importorskip("pandas")
    lines = [
        HEADER,
        "a,x; silicon_concurrency=64; y,sglang,0.5.9,deepseek-ai/DeepSeek-R1,h200_sxm,fp8,agg,1024,1024,"
        "fp8,fp8,8,1,1,8,1,8,100.0,20.0",                                              # kept
        # disaggregated; a model that is not a preset; a GPU that is not a preset; kept
        "b,x,vllm,0.19.0,deepseek-ai/DeepSeek-R1,h200_sxm,fp8,disagg,1024,1024,fp8,fp8,8,8,1,1,8,1,1,2",
        "c,x,vllm,0.19.0,meta-llama/Llama-3.1-70B,h200_sxm,fp8,agg,1024,1024,fp8,fp8,8,8,1,1,8,1,1,2",
        "d,x,vllm,0.19.0,openai/gpt-oss-120b,b300_sxm,fp4,agg,1024,1024,nvfp4,nvfp4,8,8,1,1,8,1,1,2",
        "e,x,trtllm,1.2,openai/gpt-oss-120b,gb200,fp4,agg,512,256,nvfp4,nvfp4,4,4,1,1,4,1,3.5,1.5",
    ]
    rows, counts = _extractor().extract(("\n".join(lines) + "\n").encode())
    assert list(rows["id"]) == ["a", "e"]
    assert list(rows["model"]) == ["deepseek-r1", "gpt-oss-120b"]
    assert list(rows["system"]) == ["h200-sxm", "gb200"]
    assert rows["concurrency"].iloc[0] == 64 and rows["concurrency"].isna().iloc[1]
    assert counts["rows_in_file"] == 5 and counts["preset_model_and_gpu"] == 3
    assert counts["by_mode"] == {"agg": 2, "disagg": 1} and counts["kept_agg"] == 2


def test_committed_rows_match_their_provenance():
    prov = json.loads((ex.DATA / "silicon_rows.json").read_text())
    rows = ex.load_rows()
    pinned = ("aiconfigurator-core", "0.12.0", "Apache-2.0")
    assert (prov["package"], prov["version"], prov["license"]) == pinned
    assert len(rows) == prov["counts"]["kept_agg"]
    assert {r["model"] for r in rows} <= set(prov["model_map"].values())
    assert {r["backend"] for r in rows} == set(prov["counts"]["kept_by_backend"])


def row(**kw):
    base = {"id": "r", "backend": "sglang", "model": "deepseek-r1", "system": "h200-sxm", "isl": 1024,
            "osl": 1024, "batch_size": 4, "tp_size": 8, "pp_size": 1, "attention_dp_size": 1,
            "moe_tp_size": 8, "moe_ep_size": 1, "moe_quant_mode": "fp8_block"}
    return {**base, **kw}


def test_row_mapping():
    tp = ex.represent(row())
    assert (tp["strategy"], tp["attention"], tp["batch"], tp["context"]) == \
        ("tp", "tensor-parallel attention", 4, 1024 + 512)
    assert tp["plan"] == {"model": "deepseek-r1", "system": "h200-sxm", "gpus": 8, "expert_dtype": "fp8",
                          "kv_dtype": "bf16"}
    # attention DP over 8 ranks of 4 sequences each: a global batch of 32, experts over 8 ranks
    ep = ex.represent(row(tp_size=1, attention_dp_size=8, moe_tp_size=1, moe_ep_size=8))
    assert (ep["strategy"], ep["attention"], ep["batch"]) == ("ep", "data-parallel attention", 32)
    gb = ex.represent(row(system="gb200", tp_size=16, moe_tp_size=1, moe_ep_size=16))
    assert gb["plan"]["gpus_per_node"] == 16 and gb["plan"]["gpus"] == 16
    # no attention-DP size: 8 expert GPUs over tp 8 -> DP 1; over tp 2 -> DP 4 (then TP x DP mixed)
    dp1 = ex.represent(row(attention_dp_size=None))
    assert (dp1["dp"], dp1["dp_inferred"], dp1["attention"]) == (1, True, "tensor-parallel attention")
    assert ex.represent(row(tp_size=1, attention_dp_size=None, moe_tp_size=1, moe_ep_size=8))["dp"] == 8
    for bad, why in ((dict(moe_tp_size=4, moe_ep_size=2), "experts TP x EP"),
                     (dict(attention_dp_size=None, tp_size=2), "attention TP x DP"),
                     (dict(tp_size=4, attention_dp_size=2), "attention TP x DP"),
                     (dict(moe_tp_size=4), "expert GPUs"),
                     (dict(tp_size=None), "incomplete"),
                     (dict(attention_dp_size=None, tp_size=3), "incomplete"),
                     (dict(moe_quant_mode="int4_wo"), "expert dtype")):
        with pytest.raises(ex.Skip, match=why):
            ex.represent(row(**bad))


def test_engine_argument_only_when_plan_takes_it():
    def old_plan(model, system, *, gpus=8):
        return None

    def new_plan(model, system, *, gpus=8, engine="ideal"):
        return None

    assert ex.engine_kwargs("trtllm", old_plan) == {}
    assert ex.engine_kwargs("trtllm", new_plan) == {"engine": "trtllm"}


def test_statistics_by_hand():
    # |errors| 0.1, 0.2, 0.3, 0.4, 0.5: median 0.3; p90 at rank 0.9 x 4 = 3.6: 0.4 + 0.6 x 0.1 = 0.46
    got = ex.median_p90(ex.abs_errors([1.1, 0.8, 1.3, 0.6, 1.5], [1, 1, 1, 1, 1]))
    assert got["n"] == 5 and got["median"] == pytest.approx(0.3) and got["p90"] == pytest.approx(0.46)
    assert [ex.batch_range(b) for b in (1, 7, 8, 128, 512, 4096)] == \
        ["1-7", "1-7", "8-31", "128-511", ">=512", ">=512"]


def test_prediction_uses_the_rows_strategy_and_step(monkeypatch):
    # A stand-in planner: the step is what the row's strategy reports, never another's.
    calls = []

    def fake_plan(**kw):
        calls.append(kw)
        decode = "decode_batch" in kw
        return {"strategies": [
            {"name": "ep", "feasible": True, "step_s": 1.0, "attention": "x"},
            {"name": "tp", "feasible": True, "step_s": 0.02 if decode else 0.5, "bound_step_s": 0.01,
             "attention": "tensor-parallel attention"}]}

    p = ex.predict(row(), fake_plan)
    assert p["tpot_pred_ms"] == pytest.approx(20) and p["tpot_roofline_ms"] == pytest.approx(10)
    # no engine= (the stand-in takes none): no token budget, one pass of 4 x 1024 tokens (0.5 s)
    # for the first wave; each later wave is the same pass after half a decode step (20 ms)
    assert ex.WAVES == 10
    assert p["ttft_pred_ms"] == pytest.approx((500 + 9 * (500 + 20 / 2)) / 10)
    assert calls[0]["decode_batch"] == 4 and calls[0]["context"] == 1536
    assert calls[1]["tokens"] == 4 * 1024 and calls[1]["context"] == 1024


def test_quick_run_writes_results_and_goals(tmp_path):
    out = runner.run_experiment("silicon", tmp_path, quick=True)
    res = json.loads((out.folder / "silicon_errors.json").read_text())
    assert res["rows_considered"] == ex.QUICK_ROWS
    assert res["predicted"] + sum(res["skipped"].values()) == ex.QUICK_ROWS
    assert res["predicted"] > 0
    assert set(res["goals"]) == {"tpot_median", "tpot_p90", "ttft_median", "ttft_p90"}
    assert res["errors"]["tpot"]["all"]["all"]["pred"]["n"] == res["predicted"]
    rows = json.loads((out.folder / "silicon.json").read_text())
    for r in rows:  # the error column is the prediction against the measurement
        assert r["tpot_error"] == pytest.approx(r["tpot_pred_ms"] / r["silicon_tpot_ms"] - 1)
    assert "predicted_vs_measured.png" in out.manifest["files"]


def test_burst_ttft_by_hand():
    from moelab.costmodel.phases import mean_burst_ttft

    def step(tokens):  # 1 ms per step + 1 ms per token
        return 1 + tokens
    # 4 prompts of 3 tokens, 4 tokens per step: steps of 4, 4, 4 tokens (5 ms each); the
    # requests complete with steps 1, 2, 3, 3: 5, 10, 15, 15 ms
    assert mean_burst_ttft(step, 4, 3, 4) == pytest.approx((5 + 10 + 15 + 15) / 4)
    # 3 prompts of 3: steps of 4, 4, 1 tokens (5, 5, 2 ms); completions 1, 2, 3: 5, 10, 12
    assert mean_burst_ttft(step, 3, 3, 4) == pytest.approx((5 + 10 + 12) / 3)
    # no budget, or all within one: one pass of 12 tokens
    assert mean_burst_ttft(step, 4, 3, None) == 13 and mean_burst_ttft(step, 4, 3, 100) == 13
    # many requests: the mean tends to half the one pass (linear step, no per-step cost)
    one_pass = mean_burst_ttft(lambda t: t, 1000, 100, None)
    assert mean_burst_ttft(lambda t: t, 1000, 100, 100) / one_pass == pytest.approx(0.5005)


def test_serving_ttft_by_hand():
    from moelab.costmodel.phases import mean_serving_ttft

    def step(tokens):
        return 1 + tokens
    # first wave as above (11.25 ms); later ones arrive in groups of 4 // 3 = 1 request:
    # one pass of 3 tokens (4 ms) after half a 2 ms decode step: 5 ms; two waves: the mean
    assert mean_serving_ttft(step, 4, 3, 4, waves=2, decode_s=2) == pytest.approx((11.25 + 5) / 2)
    assert mean_serving_ttft(step, 4, 3, 4, waves=1, decode_s=2) == pytest.approx(11.25)
    # no budget: a later wave is the whole burst again, plus the wait
    assert mean_serving_ttft(step, 4, 3, None, waves=3, decode_s=2) == pytest.approx((13 + 2 * 14) / 3)
