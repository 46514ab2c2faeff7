"""moelab fit: engine result files read into runs (expected values worked out by hand from the
small files in tests/data/fit), the fit recovering known factors, the profile read back by
moelab plan --profile, and bad files refused with one line."""

import json
import math
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.costmodel import fit as F
from moelab.costmodel.engine_results import Pass, read_runs
from moelab.costmodel.specs import SpecError

DATA = Path(__file__).parent / "data" / "fit"
HW = ["--system", "h100-sxm", "--cpu", "epyc-9654"]
QWEN = "Qwen/Qwen3-30B-A3B"


def _by_label(runs):
    return {r.label: r for r in runs}


# --- readers ------------------------------------------------------------------------------------


def test_vllm_serve_two_appended_results():
    runs = _by_label(read_runs(str(DATA / "vllm_serve.json")))
    assert sorted(runs) == ["#1 decode", "#2 decode", "#2 prefill"]  # TTFT only at concurrency 1
    # #1: 65536 / 64 = 1024 prompt and 16384 / 64 = 256 output tokens; context 1024 + 256 / 2
    r = runs["#1 decode"]
    assert (r.engine, r.model, r.gpus, r.measured_s) == ("vllm", QWEN, None, 0.0125)
    assert r.passes == [Pass(1, True, 8, 1152)]
    assert runs["#2 decode"].passes == [Pass(1, True, 1, 1152)] and runs["#2 decode"].measured_s == 0.009
    assert runs["#2 prefill"].passes == [Pass(1, False, 1024, 1024)]
    assert runs["#2 prefill"].measured_s == pytest.approx(0.095)


def test_vllm_throughput_needs_lengths_and_batch():
    with pytest.raises(SpecError, match="--input-len, --output-len, --batch"):
        read_runs(str(DATA / "vllm_throughput.json"))
    (r,) = read_runs(str(DATA / "vllm_throughput.json"), batch=32, input_len=512, output_len=128)
    # 100 requests in ceil(100 / 32) = 4 waves: 4 prefills of 32 x 512 tokens, 4 x 128 decode
    # steps of 32 sequences at 512 + 64 tokens of context
    assert r.measured_s == 40.0 and r.notes == []  # 100 x 640 = 64000 total_num_tokens
    assert r.passes == [Pass(4, False, 16384, 512), Pass(512, True, 32, 576)]


def test_sglang_jsonl_with_bare_infinity():
    assert math.isinf(json.loads((DATA / "sglang.jsonl").read_text().splitlines()[0].replace(
        "Infinity", "1e999"))["request_rate"])
    runs = _by_label(read_runs(str(DATA / "sglang.jsonl")))
    assert sorted(runs) == ["#1 decode", "#2 decode"]
    a, b = runs["#1 decode"], runs["#2 decode"]
    # unlimited rate, no max_concurrency: all 32 requests decode together; 2048 + 512 / 2 context
    assert (a.engine, a.model, a.gpus, a.measured_s) == ("sglang", QWEN, 2, 0.020)
    assert a.passes == [Pass(1, True, 32, 2304)]
    assert b.passes == [Pass(1, True, 4, 2304)] and b.measured_s == 0.0165


def test_llama_bench_json_pp_tg_and_pg():
    runs = _by_label(read_runs(str(DATA / "llama-bench.json")))
    pp, tg, pg = runs["#1 pp512"], runs["#2 tg128"], runs["#3 pp512+tg128"]
    assert {r.strategy for r in (pp, tg, pg)} == {"cpu-experts"}  # n_cpu_moe 48
    assert pp.measured_s == 0.4 and pp.passes == [Pass(1, False, 512, 512)]
    assert tg.measured_s == pytest.approx(3.2 / 128) and tg.passes == [Pass(1, True, 1, 64)]
    # -pg: the whole test (prompt, then 128 tokens at 512 + 64 mean context) is the figure
    assert pg.measured_s == 3.6
    assert pg.passes == [Pass(1, False, 512, 512), Pass(128, True, 1, 576)]


def test_llama_bench_jsonl_and_avg_ts(tmp_path):
    runs = _by_label(read_runs(str(DATA / "llama-bench.jsonl")))
    assert runs["#1 pp512"].measured_s == 0.128 and runs["#1 pp512"].strategy == "ep"
    assert runs["#2 tg128"].measured_s == pytest.approx(1.024 / 128)
    # without avg_ns: avg_ts counts prompt and generated tokens, (512 + 128) / 160 = 4 s
    rec = {"n_prompt": 512, "n_gen": 128, "avg_ts": 160.0, "n_gpu_layers": 99, "gpu_info": "GPU"}
    f = tmp_path / "pg.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    (r,) = read_runs(str(f))
    assert r.measured_s == pytest.approx(4.0)
    f.write_text(json.dumps({**rec, "gpu_info": ""}) + "\n")
    assert "CPU-only" in read_runs(str(f))[0].skip


def test_llama_bench_weights_from_bits_per_weight():
    from moelab.costmodel.engine_results import gguf_dtype

    json_runs = read_runs(str(DATA / "llama-bench.json"))
    jsonl_runs = read_runs(str(DATA / "llama-bench.jsonl"))
    # Q8_0 file: 8 x 32,483,932,160 B / 30,532,122,624 params = 8.511 bits per weight -> int8;
    # Q4_K_M file: 8 x 18,556,686,336 / 30,532,122,624 = 4.862 -> int4
    assert {r.expert_dtype for r in json_runs} == {"int8"}
    assert {r.expert_dtype for r in jsonl_runs} == {"int4"}
    assert any("8.51 bits per weight" in n for n in json_runs[0].notes)
    assert any("4.86 bits per weight" in n for n in jsonl_runs[0].notes)
    # 16 bits per weight (an F16 file: 2 B a parameter) is bf16; 6.5625 (Q6_K) is int8
    assert gguf_dtype(None, 2 * 10**9, 10**9)[0] == "bf16"
    assert gguf_dtype(None, 6.5625e9 / 8, 1e9)[0] == "int8"
    # without sizes, the quant type in model_type
    assert [gguf_dtype(t, None, None)[0] for t in ("qwen3moe 30B.A3B Q4_K - Medium", "x IQ3_XXS",
                                                   "x Q8_0", "x BF16", "x")] == ["int4", "int4", "int8",
                                                                                 "bf16", None]


def test_llama_bench_weights_reach_the_planner():
    import moelab

    (run,) = [r for r in read_runs(str(DATA / "llama-bench.jsonl")) if r.label == "#2 tg128"]
    pred = F.predict_run(run, F.Setup(system="h100-sxm", cpu="epyc-9654", model="qwen3-30b-a3b"), moelab.plan)
    kw = dict(gpus=1, cpu="epyc-9654", decode_batch=1, context=64, engine="llama.cpp")
    # int4 on the GPU is the planner's nvfp4 (4.5 bits a weight, as Q4_K)
    int4 = next(s for s in moelab.plan("qwen3-30b-a3b", "h100-sxm", expert_dtype="nvfp4",
                                       cpu_expert_dtype="int4", **kw)["strategies"]
                if s["name"] == pred.strategy)
    bf16 = next(s for s in moelab.plan("qwen3-30b-a3b", "h100-sxm", **kw)["strategies"]
                if s["name"] == pred.strategy)
    assert pred.step_s == pytest.approx(int4["step_s"], rel=1e-12) and int4["step_s"] < bf16["step_s"]


def test_trtllm_report():
    runs = _by_label(read_runs(str(DATA / "trtllm.json")))
    t, d = runs["#1 throughput"], runs["#1 decode"]
    # 512 requests x 1024 output tokens / (2000 tok/s per GPU x 2 GPUs) = 131.072 s; mean
    # concurrency 63.6 -> batch 64, 8 waves of 1024-token prompts and 1024 decode steps
    assert t.measured_s == pytest.approx(131.072) and (t.gpus, t.model, t.engine) == (2, QWEN, "trtllm")
    assert t.passes == [Pass(8, False, 65536, 1024), Pass(8192, True, 64, 1536)]
    assert d.measured_s == pytest.approx(0.028) and d.passes == [Pass(1, True, 64, 1536)]


def test_model_ids_name_presets():
    assert F.preset_for(QWEN) == "qwen3-30b-a3b"
    assert F.preset_for("mistralai/Mixtral-8x7B-v0.1") == "mixtral-8x7b"  # by the preset's source
    assert F.preset_for("someone/not-a-model") is None
    assert F.preset_for("x" * 5000) is None and F.preset_for("a\0b") is None


# --- predictions and the fit --------------------------------------------------------------------


@pytest.mark.parametrize("name,gpus", [("ep", 1), ("ep", 8), ("tp", 8), ("offload", 1), ("cpu-experts", 1)])
def test_combine_is_the_planners_under_a_profile(name, gpus):
    import moelab

    scale = {"compute_s": 1.7, "stream_s": 0.6, "cpu_s": 1.3, "link_s": 2.0, "tp_allreduce_s": 3.0,
             "network_s": 0.5, "nvlink_s": 2.5, "ep_latency_s": 1.5, "gpu_experts_s": 0.8}
    prof = {"moelab_profile": 1, "engine": "vllm", "fixed": {"per_step_s": 1e-3, "per_layer_s": 2e-5},
            "scale": scale}
    kw = dict(gpus=gpus, cpu="epyc-9654", decode_batch=16, context=2000, engine="vllm")
    base = next(s for s in moelab.plan("qwen3-30b-a3b", "h100-sxm", **kw)["strategies"] if s["name"] == name)
    got = next(s for s in moelab.plan("qwen3-30b-a3b", "h100-sxm", profile=prof, **kw)["strategies"]
               if s["name"] == name)
    if gpus > 1 and name == "tp":
        assert base["terms"]["tp_allreduce_s"] > 0
    elif gpus > 1:
        assert base["terms"]["nvlink_s"] > 0 and base["terms"]["ep_latency_s"] > 0
    assert F.combine(name, base["terms"]) == pytest.approx(base["step_s"], rel=1e-12)
    assert F.apply_profile(name, base["terms"], 48, prof) == pytest.approx(got["step_s"], rel=1e-12)


def test_fit_recovers_factors_from_a_stub():
    # Runs as sums of terms; measured built with compute x 1.7 and cpu x 0.5
    terms = [{"compute_s": 1.0, "network_s": 0.1}, {"compute_s": 2.0, "network_s": 0.2},
             {"compute_s": 3.0, "network_s": 0.1}, {"compute_s": 1.0, "cpu_s": 5.0}]

    def stub(i, prof):
        s = prof.get("scale", {})
        return sum(v * s.get(k, 1.0) for k, v in terms[i].items())

    measured = [1.7 * 1.0 + 0.1, 1.7 * 2.0 + 0.2, 1.7 * 3.0 + 0.1, 1.7 * 1.0 + 0.5 * 5.0]
    fit = F.fit_scales(measured, [["compute_s"]] * 3 + [["cpu_s"]], stub)
    assert fit.scale == {"compute_s": pytest.approx(1.7, rel=1e-7), "cpu_s": pytest.approx(0.5, rel=1e-7)}
    assert fit.uncertainty["cpu_s"] is None and fit.uncertainty["compute_s"] == pytest.approx(0, abs=1e-6)
    assert fit.runs_per_term == {"compute_s": 3, "cpu_s": 1}


def test_fit_refuses_a_factor_that_changes_nothing():
    # Run 0: compute 1 + max(network 0.2, nvlink 0.5): network_s is the smaller side of the max,
    # so scaling it by 2 (0.4 < 0.5) changes nothing; run 1's cpu_s term is 0. Both refused;
    # compute_s from run 2 (measured 3 x 2.0 + 0.1 = 6.1, predicted 2.0 x s + 0.1) is s = 3.
    terms = [{"compute_s": 1.0, "network_s": 0.2, "nvlink_s": 0.5}, {"compute_s": 1.0, "cpu_s": 0.0},
             {"compute_s": 2.0, "network_s": 0.1}]

    def stub(i, prof):
        t = {k: v * prof["scale"].get(k, 1.0) for k, v in terms[i].items()}
        return F.combine("ep", t) + t.get("cpu_s", 0.0)

    fit = F.fit_scales([5.0, 7.0, 6.1], [["network_s"], ["cpu_s"], ["compute_s"]], stub)
    assert set(fit.refused) == {"network_s", "cpu_s"} and fit.scale == {"compute_s": pytest.approx(3.0)}
    assert fit.runs_per_term == {"compute_s": 1}


def test_fit_uncertainty_from_log_residuals():
    # Four runs of one term, measured 2 T exp(e): log-space least squares gives exactly 2 (the
    # e average to 0), and its standard error sqrt(sum e^2 / 3 / 4) = 0.0456435 by hand.
    e = [0.1, -0.1, 0.05, -0.05]
    T = [1.0, 2.0, 0.5, 4.0]
    fit = F.fit_scales([2 * t * math.exp(x) for t, x in zip(T, e, strict=True)], [["compute_s"]] * 4,
                       lambda i, prof: T[i] * prof["scale"].get("compute_s", 1.0))
    assert fit.scale["compute_s"] == pytest.approx(2.0, rel=1e-7)
    assert fit.uncertainty["compute_s"] == pytest.approx(0.0456435, rel=1e-5)


def test_fit_recovers_a_factor_through_the_planner():
    import moelab

    (run,) = [r for r in read_runs(str(DATA / "vllm_serve.json")) if r.label == "#1 decode"]
    setup = F.Setup(system="h100-sxm", cpu="epyc-9654")
    pred = F.predict_run(run, setup, moelab.plan)
    assert pred.strategy == "ep" and pred.gpus == 1 and pred.informs == ["compute_s"]
    assert set(k for k, v in pred.terms.items() if v) == {"compute_s"}  # one GPU: no communication
    fit = F.fit_scales([1.3 * pred.step_s], [pred.informs], lambda i, prof: pred.under(prof))
    assert fit.scale["compute_s"] == pytest.approx(1.3, rel=1e-7)


def test_serving_strategy_from_recorded_parallelism():
    from moelab.costmodel.engine_results import serving_strategy

    assert serving_strategy(2, None)[0] == "tp" and serving_strategy(2, 1)[0] == "tp"  # no EP: TP experts
    assert serving_strategy(2, 2)[0] == "ep" and serving_strategy(8, None, enable_ep=True)[0] == "ep"
    assert serving_strategy(1, None)[0] == "ep" and "one GPU" in serving_strategy(1, 1)[1]
    assert serving_strategy(8, 4)[0] is None and serving_strategy(None, None)[0] is None
    assert serving_strategy(True, 2)[0] is None  # a bool is no size


def _plan_step(name, system="h100-sxm", **kw):
    import moelab

    r = moelab.plan("qwen3-30b-a3b", system, cpu="epyc-9654", **kw)
    return next(s for s in r["strategies"] if s["name"] == name)


@pytest.mark.parametrize("ep_size,strategy", [(None, "tp"), (2, "ep")])
def test_sglang_tp_without_ep_predicted_as_tp(tmp_path, ep_size, strategy):
    import moelab

    rec = json.loads((DATA / "sglang.jsonl").read_text().splitlines()[1].replace("Infinity", "1e999"))
    rec["server_info"]["ep_size"] = ep_size
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    (run,) = read_runs(str(f))
    assert run.strategy == strategy
    pred = F.predict_run(run, F.Setup(system="h100-sxm", cpu="epyc-9654"), moelab.plan)
    # run #2: 4 sequences at 2048 + 512 / 2 context on tp_size 2 GPUs
    want = _plan_step(strategy, gpus=2, decode_batch=4, context=2304, engine="sglang")
    assert pred.strategy == strategy and pred.step_s == pytest.approx(want["step_s"], rel=1e-12)
    assert run.notes[-1].startswith(f"strategy {strategy}: ")


def test_unrecorded_parallelism_takes_the_flags_else_the_best_feasible(capsys):
    argv = [str(DATA / "vllm_serve.json"), *HW, "--gpus", "2"]
    rows = _fit_json(capsys, *argv)["runs"]
    # vLLM's file records no parallelism: on 2 GPUs the faster of ep and tp (one instance on both)
    ep = _plan_step("ep", gpus=2, decode_batch=8, context=1152, engine="vllm")
    tp = _plan_step("tp", gpus=2, decode_batch=8, context=1152, engine="vllm")
    best = "ep" if ep["step_s"] < tp["step_s"] else "tp"
    assert rows[0]["strategy"] == best and "best feasible" in rows[0]["notes"][-1]
    rows = _fit_json(capsys, str(DATA / "vllm_serve.json"), *HW, "--tp", "2")["runs"]
    assert rows[0]["strategy"] == "tp" and rows[0]["predicted_s"] == pytest.approx(tp["step_s"], rel=1e-12)
    rows = _fit_json(capsys, str(DATA / "vllm_serve.json"), *HW, "--tp", "2", "--ep", "2")["runs"]
    assert rows[0]["strategy"] == "ep" and rows[0]["predicted_s"] == pytest.approx(ep["step_s"], rel=1e-12)


def test_consumer_card_picks_what_fits_or_says_it_does_not(capsys, tmp_path):
    # qwen3-30b-a3b bf16: about 30.5e9 params x 2 B = 61 GB, over a 24 GB RTX 4090 (and two)
    card = ["--system", "rtx-4090", "--cpu", "epyc-9654"]
    assert main(["fit", str(DATA / "vllm_serve.json"), *card, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert {r["strategy"] for r in rows} == {"offload"}  # vLLM's --cpu-offload-gb: the one that fits
    assert not _plan_step("ep", "rtx-4090", gpus=1, decode_batch=8, context=1152)["feasible"]
    out = tmp_path / "p.json"
    assert main(["fit", str(DATA / "sglang.jsonl"), *card, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not fit: no strategy sglang runs fits" in err and err.count("\n") == 1 and not out.exists()
    # llama-bench with n_cpu_moe 48: the experts in host RAM, so it fits
    assert main(["fit", str(DATA / "llama-bench.json"), *card, "--model", "qwen3-30b-a3b", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert {r["strategy"] for r in rows} == {"cpu-experts"} and all(r["skip"] is None for r in rows)
    # all on the GPU (n_cpu_moe 0): the Q4 file (about 30.5e9 x 4.5 / 8 = 17 GB) fits 21.6 GB;
    # at bf16 (61 GB) it does not, and says so
    jsonl = [str(DATA / "llama-bench.jsonl"), *card, "--model", "qwen3-30b-a3b"]
    assert main(["fit", *jsonl, "--json"]) == 0
    assert {r["strategy"] for r in json.loads(capsys.readouterr().out)["runs"]} == {"ep"}
    assert main(["fit", *jsonl, "--expert-dtype", "bf16"]) == 2
    assert "does not fit: moelab's ep (n_cpu_moe 0: all on the GPU)" in capsys.readouterr().err


# --- the command --------------------------------------------------------------------------------


def _fit_json(capsys, *argv):
    assert main(["fit", *argv, *HW, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("files,extra", [
    (["vllm_serve.json"], []),
    (["vllm_throughput.json"], ["--model", "qwen3-30b-a3b", "--input-len", "512", "--output-len", "128",
                                "--batch", "32"]),
    (["sglang.jsonl"], []),
    (["llama-bench.json", "llama-bench.jsonl"], ["--model", "qwen3-30b-a3b"]),
    (["trtllm.json"], []),
])
def test_each_format_prints_measured_vs_predicted(capsys, files, extra):
    argv = ["fit", *[str(DATA / f) for f in files], *HW, *extra]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "predicted" in out and "profile for" in out
    data = _fit_json(capsys, *argv[1:])
    for row in data["runs"]:
        assert row["skip"] is None and row["predicted_s"] > 0
        assert row["bound_s"] <= row["predicted_s"] * (1 + 1e-12)
        assert row["error"] == pytest.approx(row["predicted_s"] / row["measured_s"] - 1)


def test_one_run_one_factor_is_fitted_exactly(capsys):
    data = _fit_json(capsys, str(DATA / "vllm_throughput.json"), "--model", "qwen3-30b-a3b",
                     "--input-len", "512", "--output-len", "128", "--batch", "32")
    (row,) = data["runs"]
    assert row["informs"] == ["compute_s"] and row["fitted_s"] == pytest.approx(40.0, rel=1e-6)
    assert data["profile"]["uncertainty"] == {"compute_s": None}
    assert data["profile"]["source"] == (f"moelab fit {DATA / 'vllm_throughput.json'} --system h100-sxm "
                                         "--cpu epyc-9654 --model qwen3-30b-a3b --batch 32 --input-len 512 "
                                         "--output-len 128")


def test_profile_round_trips_through_plan(tmp_path, capsys):
    out = tmp_path / "vllm.json"
    assert main(["fit", str(DATA / "vllm_serve.json"), *HW, "--out", str(out)]) == 0
    capsys.readouterr()
    prof = json.loads(out.read_text())
    assert prof["moelab_profile"] == 1 and prof["engine"] == "vllm" and list(prof["scale"]) == ["compute_s"]
    assert prof["fixed"] == {"per_step_s": 0.0, "per_layer_s": 0.0}
    assert [r["run"] for r in prof["fitted_from"]] == ["#1 decode", "#2 decode", "#2 prefill"]
    s = prof["scale"]["compute_s"]
    # plan --profile on run #1's workload: one GPU's EP step is all compute, so it scales by s
    argv = ["plan", "--model", "qwen3-30b-a3b", *HW, "--gpus", "1", "--decode-batch", "8",
            "--context", "1152", "--engine", "vllm", "--json"]
    assert main(argv) == 0
    plain = next(x for x in json.loads(capsys.readouterr().out)["strategies"] if x["name"] == "ep")
    assert main([*argv, "--profile", str(out)]) == 0
    fitted = next(x for x in json.loads(capsys.readouterr().out)["strategies"] if x["name"] == "ep")
    assert fitted["step_s"] == pytest.approx(s * plain["step_s"], rel=1e-12)


# --- bad files ----------------------------------------------------------------------------------


def _refused(tmp_path, capsys, files, *extra):
    out = tmp_path / "profile.json"
    assert main(["fit", *map(str, files), *HW, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moelab fit: error: ")
    assert not out.exists()
    return err


def test_bad_files_one_line_exit_2_nothing_written(tmp_path, capsys):
    def write(name, text):
        f = tmp_path / name
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        return f

    assert "no format moelab fit reads" in _refused(tmp_path, capsys, [write("a.json", '{"foo": 1}')])
    serve = json.loads((DATA / "vllm_serve.json").read_text().splitlines()[0])
    del serve["mean_tpot_ms"]
    assert "no 'mean_tpot_ms'" in _refused(tmp_path, capsys, [write("b.json", json.dumps(serve))])
    assert "holds no JSON objects" in _refused(tmp_path, capsys, [write("c.json", "[]")])
    assert "not valid JSON" in _refused(tmp_path, capsys, [write("d.json", '{"model_id": "x", ')])
    assert "not UTF-8" in _refused(tmp_path, capsys, [write("e.json", b'{"a": "\xff"}')])
    cpu_only = json.loads((DATA / "llama-bench.jsonl").read_text().splitlines()[0])
    f = write("f.jsonl", json.dumps({**cpu_only, "n_gpu_layers": 0}))
    assert "no run can be predicted" in _refused(tmp_path, capsys, [f], "--model", "qwen3-30b-a3b")
    assert "give --model" in _refused(tmp_path, capsys, [DATA / "llama-bench.jsonl"])
    dense = write("dense.json", json.dumps({"model_type": "llama", "hidden_size": 64,
                                            "intermediate_size": 128, "num_hidden_layers": 2,
                                            "num_attention_heads": 4, "vocab_size": 100}))
    assert "not a mixture of experts" in _refused(tmp_path, capsys, [DATA / "llama-bench.jsonl"],
                                                  "--model", str(dense))
    assert "--engine" in _refused(tmp_path, capsys, [DATA / "sglang.jsonl", DATA / "trtllm.json"])
    huge = json.loads((DATA / "llama-bench.jsonl").read_text().splitlines()[0])
    f = write("g.jsonl", json.dumps({**huge, "n_prompt": 10**12}))
    assert "outside 1..16,777,216" in _refused(tmp_path, capsys, [f], "--model", "qwen3-30b-a3b")
    assert "--gpus" in _refused(tmp_path, capsys, [DATA / "sglang.jsonl"], "--gpus", "0")


def test_out_into_a_missing_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "no" / "such" / "p.json"
    assert main(["fit", str(DATA / "vllm_serve.json"), *HW, "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not out.parent.exists()


def test_any_value_in_a_result_file_gives_exit_0_or_one_line(tmp_path_factory):
    """Each format's keys set to extreme values: a prediction or one line and exit 2, never a
    traceback."""
    import contextlib
    import io

    from hypothesis import given, settings
    from hypothesis import strategies as st

    records = {
        "vllm_serve.json": json.loads((DATA / "vllm_serve.json").read_text().splitlines()[0]),
        "sglang.jsonl": json.loads((DATA / "sglang.jsonl").read_text().splitlines()[1].replace(
            "Infinity", "1e999")),
        "llama-bench.jsonl": json.loads((DATA / "llama-bench.jsonl").read_text().splitlines()[1]),
        "trtllm.json": json.loads((DATA / "trtllm.json").read_text()),
        "vllm_throughput.json": json.loads((DATA / "vllm_throughput.json").read_text()),
    }
    values = st.sampled_from([0, -1, 1, 2**63, 10**12, 1.5, float("nan"), float("inf"), "x", None, [], {}])
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=25, deadline=None)  # 400 pass; 25 keep CI short
    @given(st.sampled_from(sorted(records)), st.data(), values)
    def check(name, data, value):
        rec = json.loads(json.dumps(records[name]))
        part = rec
        if name == "trtllm.json":
            part = rec[data.draw(st.sampled_from(["world_info", "request_info", "performance"]))]
        part[data.draw(st.sampled_from(sorted(part)))] = value
        f = folder / name
        f.write_text(json.dumps(rec))
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main(["fit", str(f), *HW, "--model", "qwen3-30b-a3b", "--input-len", "8",
                       "--output-len", "8", "--batch", "2"])
        assert rc == 0 or (rc == 2 and err.getvalue().count("\n") == 1), err.getvalue()

    check()
