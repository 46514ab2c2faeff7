"""`moelab calibrate --cpu`: a CPU file in cpus.json's schema that `moelab plan --cpu FILE`
reads and uses (issue 20, section 3). One real --quick measurement for the module; the
expected values are computed here from the file's own figures, not from the planner."""

import json
from dataclasses import replace

import pytest

from moelab import api
from moelab.cli import main
from moelab.costmodel.presets import PRESETS, load_cpu


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu") / "cpu.json"
    assert main(["calibrate", "--cpu", "--quick", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_the_file_holds_measured_figures_and_says_how(calibrated):
    path, data = calibrated
    assert data["dram_measured_GBps"] > 0 and data["dram_channels"] is None
    for dtype in ("bf16", "int8"):  # torch 2.13's CPU build has both kernels
        assert data["matmul_measured_TOPS"][dtype] > 0 and data["gemv_measured_GBps"][dtype] > 0
    # Each measured figure names the torch kernel that measured it.
    assert "torch._int_mm" in data["measured"]["matmul_measured_TOPS.int8"]
    assert "_weight_int8pack_mm" in data["measured"]["gemv_measured_GBps.int8"]
    assert "triad" in data["measured"]["dram_measured_GBps"]
    if data["matmul_measured_TOPS"]["int4"] is None:  # a torch without the int4 kernel says so
        assert data["measured"]["matmul_measured_TOPS.int4"].startswith("not measured")


def test_the_file_round_trips(calibrated):
    """Written, loaded: the CpuSpec holds the file's figures (per socket x sockets, SI)."""
    path, data = calibrated
    c = load_cpu(str(path))
    s = data["sockets"]
    assert (c.name, c.sockets, c.dram_bw) == (data["name"], s, 0)  # no nominal: channels unknown
    assert c.dram_bw_measured == pytest.approx(data["dram_measured_GBps"] * 1e9 * s, rel=1e-12)
    assert c.matmul_measured == pytest.approx(
        {d: v * 1e12 * s for d, v in data["matmul_measured_TOPS"].items() if v})
    assert c.gemv_measured == pytest.approx(
        {d: v * 1e9 * s for d, v in data["gemv_measured_GBps"].items() if v})
    # And written again from what was read, it reads the same.
    again = path.with_name("again.json")
    again.write_text(json.dumps(data))
    assert load_cpu(str(again)) == c


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_plan_uses_the_measured_figures(calibrated, dtype):
    """cpu-experts on qwen3-30b-a3b, decode batch 1, worst-case routing, one GPU: the CPU
    term is L max(k S_E f / GEMV GB/s, 2 k S_E / matrix ops/s) from the file's figures."""
    path, data = calibrated
    cfg = json.loads((PRESETS / "models" / "qwen3-30b-a3b.json").read_text())
    L, k = cfg["num_hidden_layers"], cfg["num_experts_per_tok"]
    S_E = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    f = {"int8": 8.5 / 8, "bf16": 2.0}[dtype]  # Q8_0: 32 int8 and one fp16 scale; bf16: 2 B
    gemv = data["gemv_measured_GBps"][dtype] * 1e9
    ops = data["matmul_measured_TOPS"][dtype] * 1e12
    expected = L * max(k * S_E * f / gemv, 2 * k * S_E / ops)
    r = api.plan("qwen3-30b-a3b", "h100-sxm", cpu=str(path), gpus=1, decode_batch=1,
                 routing="worst", cpu_expert_dtype=dtype)
    got = next(s for s in r["strategies"] if s["name"] == "cpu-experts")
    assert got["terms"]["cpu_s"] == pytest.approx(expected, rel=1e-9)
    assert r["host"]["cpu_matrix_rate_measured"] and r["host"]["cpu_weight_bw_measured"]


def _with(data: dict, **changes) -> dict:
    return {**data, **changes}


def test_a_measured_figure_beats_a_peak_unless_nominal(tmp_path, calibrated):
    """Give the file a peak too (ops_per_core_cycle, a clock): plan still takes the measured
    rate; --nominal takes the peak."""
    _, data = calibrated
    path = tmp_path / "both.json"
    rates = {"avx2": {"bf16": 32, "int8": 64}}  # made up for the test
    path.write_text(json.dumps(_with(data, base_GHz=2.0, ops_per_core_cycle=rates)))
    c = load_cpu(str(path))
    peak = data["cores"] * 2.0e9 * 64 * data["sockets"]
    assert c.isa == "avx2" and c.matmul_flops["int8"] == pytest.approx(peak)
    assert c.matmul_rate("int8") == (c.matmul_measured["int8"], True)
    assert c.matmul_rate("int8", nominal=True) == (pytest.approx(peak), False)
    # int4 computes in int8: without a measured int4 rate, the int8 peak.
    no_int4 = replace(c, matmul_measured={d: v for d, v in c.matmul_measured.items() if d != "int4"})
    assert no_int4.matmul_rate("int4") == (pytest.approx(peak), False)


def test_measured_dram_above_the_nominal_is_refused(tmp_path, calibrated, capsys):
    """This machine's channels and MT/s are not readable here (a VM, no SMBIOS), so the rule
    'measured < nominal when both are known' is tested on files built around the measured
    figure: a nominal above it loads; one below it is one line and exit 2."""
    _, data = calibrated
    measured = data["dram_measured_GBps"]
    ok, bad = tmp_path / "ok.json", tmp_path / "bad.json"
    # 1 channel: nominal = 8 B x MT/s; pick MT/s so the nominal is 2x (ok) or 0.5x (bad) the measured.
    ok.write_text(json.dumps(_with(data, dram_channels=1, dram_MTps=measured * 2e3 / 8)))
    bad.write_text(json.dumps(_with(data, dram_channels=1, dram_MTps=measured * 0.5e3 / 8)))
    c = load_cpu(str(ok))
    assert c.dram_bw == pytest.approx(2 * measured * 1e9 * data["sockets"]) and c.dram_bw > c.dram_bw_measured
    assert main(["plan", "--cpu", str(bad), "--gpus", "1", "--decode-batch", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "dram_measured_GBps" in err


def test_calibrate_cpu_refuses_gpu_flags(capsys):
    assert main(["calibrate", "--cpu", "--system", "h100-sxm"]) == 2
    assert "--system" in capsys.readouterr().err


@pytest.mark.parametrize("quick", [True, False])
def test_the_gemv_streams_at_least_4x_the_cache(monkeypatch, quick):
    """The one-token product reads its weights from DRAM in both modes: the copies it takes in
    turn hold >= 4x the last-level cache the module reads (--quick is quicker by rounds, not
    bytes). Small shapes and a small cache stand in for the real ones; no timing is checked."""
    from moelab.costmodel import cpu_bench

    llc = 3 << 20
    monkeypatch.setattr(cpu_bench, "last_level_cache_bytes", lambda: llc)
    monkeypatch.setattr(cpu_bench, "SIDE", {True: 256, False: 512})
    streamed = []
    real = cpu_bench._best_over

    def spy(fn, items, rounds):
        streamed.append(sum(v.numel() * v.element_size() for v in items))
        return real(fn, items[:1], 1)  # the bytes are what is tested, not the time

    monkeypatch.setattr(cpu_bench, "_best_over", spy)
    m = cpu_bench.matrix_products(quick)
    side = {True: 256, False: 512}[quick]
    per_copy = {"bf16": side * side * 2, "int8": side * side, "int4": side * side // 2}  # by hand
    measured = [d for d in ("bf16", "int8", "int4") if m[d]["gemv_Bps"] is not None]
    assert {"bf16", "int8"} <= set(measured) and len(streamed) == len(measured)
    for d, total in zip(measured, streamed, strict=True):
        assert total >= 4 * llc and total == m[d]["gemv_weight_bytes"]
        assert total == -(-4 * llc // per_copy[d]) * per_copy[d]  # whole copies, the fewest that reach 4x


def test_the_quick_file_says_its_gemv_weights_pass_4x_the_cache(calibrated):
    from moelab.costmodel.cpu_bench import last_level_cache_bytes

    _, data = calibrated
    for d in ("bf16", "int8"):
        text = data["measured"][f"gemv_measured_GBps.{d}"]
        mib = int(text.split("copies totalling ")[1].split(" MiB")[0])
        assert mib << 20 >= 4 * last_level_cache_bytes()


def _cpu_reasons(cpu, engine="ktransformers", **kw) -> dict:
    r = api.plan("qwen3-30b-a3b", "h100-sxm", cpu=cpu, gpus=1, decode_batch=1, routing="worst",
                 cpu_expert_dtype="int8", engine=engine, **kw)
    return {s["name"]: s["reason"] for s in r["strategies"] if s["name"] in ("cpu-experts", "hybrid")}


def test_the_reason_names_measured_rates_and_no_factor_they_replace(calibrated):
    """A calibrated file: the reason quotes the file's int8 matrix rate and GEMV (all sockets)
    as measured, and neither the engine's DRAM fraction, NUMA scaling nor matrix efficiency,
    which the measured rates replace; the per-layer sync still applies and is quoted."""
    path, data = calibrated
    s = data["sockets"]
    tops = f"{data['matmul_measured_TOPS']['int8'] * s:.3g} T ops/s"
    gbps = f"{data['gemv_measured_GBps']['int8'] * s:.3g} GB/s"
    reasons = _cpu_reasons(str(path))
    assert set(reasons) == {"cpu-experts", "hybrid"}
    for reason in reasons.values():
        assert f"int8 matrix rate {tops} measured in calibrated-cpu" in reason
        assert f"int8 one-token GEMV {gbps} measured in calibrated-cpu" in reason
        for factor in ("of nominal per socket", "matrix figure", "of peak", "NUMA"):
            assert factor not in reason
        assert "us per layer" in reason  # the sync


def test_the_reason_of_a_preset_quotes_the_engine_factors_it_applies():
    """A preset (nominal DRAM, peak matrix rates, nothing measured): the engine's DRAM fraction
    and matrix efficiency are applied, so quoted; nothing is called measured."""
    for reason in _cpu_reasons("xeon-gold-6454s", cpu_isa="amx", host_mem=1e12).values():
        assert "of nominal per socket" in reason and "of peak" in reason
        assert "measured in" not in reason
    # The roofline engine applies no factor and quotes none.
    for reason in _cpu_reasons("xeon-gold-6454s", engine="ideal", cpu_isa="amx", host_mem=1e12).values():
        assert "nominal" not in reason and "measured in" not in reason
