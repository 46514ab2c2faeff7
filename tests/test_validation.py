"""The validation experiment's bookkeeping: schema, sources, independent inputs, leave-one-out fits,
statistics over the right rows, and every prediction recomputed by hand from its stated inputs.

The recomputations below are written out independently of experiments/exp_validation.py (the
formulas as the docs state them, numbers from systems.json and published.json directly).
"""

from __future__ import annotations

import json
import statistics

import pytest

from moelab.costmodel.presets import PRESETS
from moelab.experiments import exp_validation as ev
from moelab.experiments import runner

REQUIRED = {
    "name": str,
    "kind": str,
    "source": str,
    "measured": float,
    "unit": str,
    "fitted": bool,
    "inputs": dict,
}


@pytest.fixture(scope="module")
def pub():
    return json.loads((PRESETS / "published.json").read_text())


@pytest.fixture(scope="module")
def systems():
    return json.loads((PRESETS / "systems.json").read_text())


@pytest.fixture(scope="module")
def rows(pub):
    links = ev.independent_links(ev.config(False), pub)
    return (
        ev.low_latency_rows(pub, links)
        + ev.normal_rows(pub, links)
        + ev.link_rows(pub)
        + ev.end_to_end_rows(pub, plan=None)
    )


def is_fit(source: str) -> bool:
    return source.startswith(("leave-one-out fit", "leave-one-source-out fit"))


# --- schema and sources ---------------------------------------------------------------------------


def test_every_row_has_the_schema(rows):
    assert rows
    for r in rows:
        for key, typ in REQUIRED.items():
            assert key in r, (r["name"], key)
            assert isinstance(r[key], int | float) if typ is float else isinstance(r[key], typ), (
                r["name"],
                key,
            )
        assert r["kind"] in ev.KINDS
        assert r["measured"] > 0
        if r["predicted"] is None:
            assert r["error"] is None and r["status"] != "predicted"
        else:
            assert r["error"] == pytest.approx(r["predicted"] / r["measured"] - 1, rel=1e-12, abs=1e-15)
            assert r["status"] == "predicted"


def test_every_source_and_input_source_is_named(rows, pub):
    sources = pub["sources"]
    for s in sources.values():
        assert s["cite"] and s["place"]
    for r in rows:
        assert r["source"] in sources, r["name"]
        for name, src in r["inputs"].items():
            assert is_fit(src) or src in sources, (r["name"], name, src)


def test_no_prediction_shares_a_source_with_its_inputs(rows):
    for r in rows:
        for name, src in r["inputs"].items():
            assert src != r["source"], f"{r['kind']} {r['name']}: input {name} comes from its own source"


def test_the_deepep_rows_no_longer_take_links_from_the_deepep_caption(rows):
    deepep = [r for r in rows if r["kind"] in ("deepep-ll", "deepep-ll-nvlink", "deepep-normal")]
    assert len(deepep) == 12 + 12 + 8
    for r in deepep:
        assert r["source"] == "deepep-v1"
        assert "deepep-v1" not in r["inputs"].values()
        for key in ("b_net", "b_link"):
            if key in r["input_values"]:
                assert r["input_values"][key] not in (50e9, 160e9)


def test_fits_never_see_the_point_they_predict(rows):
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    for r in rows:
        for name, fit in r["fits"].items():
            assert r["name"] not in fit["rows"], (r["kind"], r["name"], name)
            if r["inputs"][name].startswith("leave-one-source-out"):
                used = [x for x in by_kind[r["kind"]] if x["name"] in fit["rows"]]
                assert used and all(x["source"] != r["source"] for x in used)


def test_no_row_is_fitted_in_sample(rows):
    # Every fit is leave-one-out, so no row is excluded from the statistics as fitted.
    assert not any(r["fitted"] for r in rows)


# --- the recomputation, by hand ----------------------------------------------------------------------


def test_bytes_per_token_by_hand(pub):
    ll = pub["deepep_low_latency"]
    # fp8 dispatch: 7168 one-byte values + 7168/128 = 56 scales of 4 bytes = 7392 B; bf16 combine: 14,336 B.
    assert ev.bytes_per_token(ll, "dispatch") == 7168 + 56 * 4 == 7392
    assert ev.bytes_per_token(ll, "combine") == 14336


def test_pure_rdma_floor_at_ep8_is_slower_than_deepep_measured(rows):
    # 128 tokens x 8 copies x 7392 B = 7,569,408 B; 7/8 leave the GPU over a 49 GB/s NIC: 135.17 µs > 77 µs.
    r = next(x for x in rows if x["kind"] == "deepep-ll" and x["name"] == "dispatch EP8")
    assert r["settings"]["bytes"] == 128 * 8 * 7392
    assert r["input_values"]["b_net"] == 49e9
    floor = 7_569_408 * 7 / 8 / 49e9 * 1e6
    assert floor == pytest.approx(135.17, abs=0.01)
    assert r["measured"] == 77 and floor > r["measured"]


def test_every_prediction_recomputed_from_its_stated_inputs(rows):
    for r in rows:
        if r["predicted"] is None:
            continue
        s, v = r["settings"], r["input_values"]
        if r["kind"] == "deepep-ll":
            t = v["alpha_net_s"] + s["bytes"] * (s["ep"] - 1) / s["ep"] / v["b_net"]
            want = t * 1e6
        elif r["kind"] == "deepep-ll-nvlink":
            R, G = s["ep"], s["gpus_per_node"]
            nic = s["bytes"] * max(R - G, 0) / R / v["b_net"]
            nvl = s["bytes"] * (min(R, G) - 1) / R / v["b_nvlink"]
            want = (v["alpha_net_s"] + max(nic, nvl)) * 1e6
        elif r["kind"] == "deepep-ll-bytes":
            want = s["tokens_per_rank"] * s["top_k"] * s["bytes_per_token"] / 1e6
        elif r["kind"] == "deepep-normal":
            want = v["b_link"] / 1e9
        elif r["kind"].startswith("link-"):
            want = v["eta"] * s["nominal_GBps"]
        elif r["kind"] == "e2e-offload":
            continue  # by hand, with the model shapes, in test_offload_rows_recomputed_by_hand
        else:
            pytest.fail(f"no hand recomputation for kind {r['kind']}")
        assert r["predicted"] == pytest.approx(want, rel=1e-12), (r["kind"], r["name"])


def test_leave_one_out_alpha_recomputed(rows):
    ll = {r["name"]: r for r in rows if r["kind"] == "deepep-ll"}
    for r in ll.values():
        fit = r["fits"]["alpha_net_s"]
        assert sorted(fit["rows"]) == sorted(n for n in ll if n != r["name"])
        residuals = []
        for n in fit["rows"]:
            o = ll[n]["settings"]
            residuals.append(ll[n]["measured"] * 1e-6 - o["bytes"] * (o["ep"] - 1) / o["ep"] / 49e9)
        assert fit["value"] == pytest.approx(max(sum(residuals) / len(residuals), 0.0), abs=1e-15)
        assert r["input_values"]["alpha_net_s"] == fit["value"]


def test_link_efficiencies_recomputed_from_systems_json(rows, systems, pub):
    flat = {**systems["host_links"], **systems["networks"]}
    ls = pub["link_sources"]
    links = [r for r in rows if r["kind"].startswith("link-")]
    for r in links:
        used = r["fits"]["eta"]["rows"]
        etas = [flat[n]["measured_GBps"] / flat[n]["bandwidth_GBps"] for n in used]
        assert r["input_values"]["eta"] == pytest.approx(sum(etas) / len(etas))
        assert all(ls[n]["measured"] != ls[r["name"]]["measured"] for n in used)
        assert r["measured"] == flat[r["name"]]["measured_GBps"]
    # PCIe Gen5 by hand: Gen3 12.15/16, Gen4 25.13/32 and C2C 346/450 -> eta 0.7712, x 64 = 49.36 GB/s
    # against 35.2.
    gen5 = next(r for r in links if r["name"] == "pcie-gen5-x16")
    assert gen5["predicted"] == pytest.approx((12.15 / 16 + 25.13 / 32 + 346 / 450) / 3 * 64)
    assert gen5["error"] == pytest.approx(49.36 / 35.2 - 1, abs=1e-3)


def test_measured_links_are_all_validated_or_excluded_with_a_reason(systems, pub):
    measured = {
        n for g in ("host_links", "networks") for n, lk in systems[g].items() if lk.get("measured_GBps")
    }
    ls = pub["link_sources"]
    covered = {n for n in ls if not n.startswith("_") and n != "excluded"}
    assert measured == covered | set(ls["excluded"])
    assert all(ls["excluded"].values())


def test_the_device_to_host_row_is_gone(rows):
    assert not any("device→host" in r["name"] or "device_to_host" in r["name"] for r in rows)


# --- statistics ------------------------------------------------------------------------------------


def fake(kind, err, fitted=False, predicted=True):
    return {
        "kind": kind,
        "fitted": fitted,
        "error": err if predicted else None,
        "roofline_error": 3 * err if predicted else None,  # the roofline, 3x further off
        "predicted": 1.0 if predicted else None,
    }


def test_statistics_exclude_fitted_and_pending_rows():
    rows = [
        fake("a", 0.1),
        fake("a", -0.3),
        fake("a", 0.2),
        fake("a", 5.0, fitted=True),
        fake("a", None, predicted=False),
        fake("b", None, predicted=False),
    ]
    s = ev.stats_by_kind(rows)
    assert s["a"] == {
        "rows": 5,
        "tested": 3,
        "fitted": 1,
        "pending": 1,
        "median_abs_error": 0.2,
        "max_abs_error": 0.3,
        "median_abs_error_roofline": pytest.approx(0.6),  # median of 0.3, 0.9, 0.6
    }
    assert s["b"]["tested"] == 0 and s["b"]["median_abs_error"] is None and s["b"]["pending"] == 1


def test_end_to_end_statistics_per_kind_by_hand():
    # A tiny table: EP rows with errors -0.40, +0.10, -0.15 (SLO-bound), +0.05 (SLO-bound), one
    # fitted (not counted); offload rows +0.30, -0.10. Medians by hand:
    #   EP, all counted: |e| = 0.40, 0.10, 0.15, 0.05 -> (0.10 + 0.15) / 2 = 0.125 -> goal 15% met;
    #   EP, saturated only: 0.40, 0.10 -> 0.25; SLO-bound: 2 rows, 1 predicted below measured;
    #   offload: 0.30, 0.10 -> 0.20 <= 25% met.
    def row(kind, err, slo=None, fitted=False):
        return {**fake(kind, err, fitted=fitted), "slo_bound": slo}
    rows = [row("e2e-ep", -0.40), row("e2e-ep", 0.10), row("e2e-ep", -0.15, slo="production average"),
            row("e2e-ep", 0.05, slo="under a TTFT limit"), row("e2e-ep", 3.0, fitted=True),
            row("e2e-offload", 0.30), row("e2e-offload", -0.10)]
    s = ev.stats_by_kind(rows)
    ep, off = s["e2e-ep"], s["e2e-offload"]
    assert ep["median_abs_error"] == pytest.approx(0.125) and ep["goal_median_abs_error"] == 0.15
    assert ep["goal_met"] is True
    assert ep["median_abs_error_saturated"] == pytest.approx(0.25)
    assert (ep["slo_bound_rows"], ep["slo_bound_predicted_below"]) == (2, 1)
    assert off["median_abs_error"] == pytest.approx(0.20) and off["goal_met"] is True
    assert off["goal_median_abs_error"] == 0.25 and off["slo_bound_rows"] == 0
    assert "goal_median_abs_error" not in ev.stats_by_kind([fake("deepep-ll", 0.1)])["deepep-ll"]


def test_every_plan_row_names_its_engine_and_the_slo_bound_rows_say_why(pub):
    for r in pub["end_to_end"]["rows"]:
        pred = r["predictor"]
        assert pred.get("engine_is"), r["name"]
        if pred["tool"] == "plan":
            assert pred["plan"].get("engine") in ("sglang", "vllm", "trtllm", "ktransformers", "llama.cpp"), \
                r["name"]
        if r["source"] in ("deepseek-day6", "rtp-llm-deepseek"):
            assert r.get("slo_bound"), r["name"]
    # DeepSeek's prefill figure counts cache hits: the prediction divides by the computed share,
    # 1 - 342B / 608B input tokens (the source's own figures), about 0.437
    ds = next(r for r in pub["end_to_end"]["rows"] if r["name"].startswith("DeepSeek prefill, production"))
    assert 1 - ds["settings"]["served_from_cache_share"] == pytest.approx(1 - 342 / 608, abs=1e-3)


def test_statistics_of_the_real_rows(rows):
    s = ev.stats_by_kind(rows)
    ll = sorted(abs(r["error"]) for r in rows if r["kind"] == "deepep-ll")
    assert s["deepep-ll"]["median_abs_error"] == pytest.approx((ll[5] + ll[6]) / 2)
    assert s["deepep-ll"]["max_abs_error"] == ll[-1]


# --- end to end ------------------------------------------------------------------------------------


def test_end_to_end_rows_are_enough_and_fully_described(pub):
    e2e = pub["end_to_end"]["rows"]
    assert len(e2e) >= 8
    assert len({r["source"] for r in e2e}) >= 4
    assert len({r["kind"] for r in e2e}) >= 2
    for r in e2e:
        assert r["source"] in pub["sources"]
        assert r["published"] and r["hardware"] and r["settings"] and r["unit"] and r["measured"] > 0
        p = r["predictor"]
        assert p["tool"] in ("plan", "gamma")
        if p["tool"] == "plan":
            assert p["strategy"] in ("ep", "offload", "cpu-experts", "hybrid")
            assert {"model", "system", "gpus", "gpus_per_node"} <= set(p["plan"])
            assert ("tokens" in p["plan"]) != ("decode_batch" in p["plan"])


def test_without_plan_the_plan_rows_are_pending_and_the_gamma_rows_predicted(pub):
    rows = ev.end_to_end_rows(pub, plan=None)
    for r in rows:
        if r["predictor"]["tool"] == "plan":
            assert r["predicted"] is None and r["status"] == ev.PENDING
        else:
            assert r["status"] == "predicted" and r["predicted"] > 0
    assert ev.stats_by_kind(rows)["e2e-ep"]["tested"] == 0


def test_offload_rows_recomputed_by_hand(pub):
    rows = {
        r["name"]: r
        for r in ev.end_to_end_rows(pub, plan=None)
        if r["kind"] == "e2e-offload" and r["source"] == "moe-infinity"
    }
    assert len(rows) == 2
    # Per decode token at batch 1, no cache: L layers x k experts x 3 d I parameters x 2 bytes (fp16)
    # over B_pcie = 25.13 GB/s (PCIe Gen4 host to device, nvbandwidth issue 42).
    mixtral = 32 * 2 * 3 * 4096 * 14336 * 2 / 25.13e9  # 0.8973 s
    qwen3 = 48 * 8 * 3 * 2048 * 768 * 2 / 25.13e9  # 0.1442 s
    by_model = {r["predictor"]["gamma"]["model"]: r for r in rows.values()}
    assert by_model["mixtral-8x7b"]["predicted"] == pytest.approx(mixtral, rel=1e-9)
    assert by_model["qwen3-30b-a3b"]["predicted"] == pytest.approx(qwen3, rel=1e-9)
    for r in rows.values():
        assert r["inputs"]["b_pcie"] == "nvbandwidth-42" != r["source"]


def test_quantized_offload_rows_recomputed_by_hand(pub):
    # Mixtral offloading, Table 2, 'W/o LRU cache & pre-loading': per decode token at batch 1 every
    # layer copies its 2 active experts. Bytes per expert weight from Table 1's sizes (GiB, 4-bit
    # attention): fp16 experts 85.16, 2-bit 17.54, 3-bit 21.37; the difference is what quantizing
    # the 32 x 8 experts of 3 x 4096 x 14336 weights saved against 2 bytes each. Host links: the
    # A100 and the 3080 Mobile on PCIe Gen4 (25.13 GB/s, nvbandwidth-42), the 3060 and the T4 on
    # Gen3 (12.15 GB/s, gearshifft-82).
    weights = 32 * 8 * 3 * 4096 * 14336  # 45.10e9, the report's "45.1B"
    rows = [r for r in ev.end_to_end_rows(pub, plan=None) if r["source"] == "mixtral-offloading"]
    assert len(rows) == 8
    for r in rows:
        size = 17.54 if "2-bit" in r["name"] else 21.37
        gen4 = "A100" in r["name"] or "3080" in r["name"]
        b_pcie, src = (25.13e9, "nvbandwidth-42") if gen4 else (12.15e9, "gearshifft-82")
        f_e = 2 - (85.16 - size) * 2**30 / weights  # 2-bit: 0.390 B (3.12 bits), 3-bit: 0.481 B (3.85 bits)
        per_token = 32 * 2 * 3 * 4096 * 14336 * f_e  # 2-bit: 4.40 GB
        want = per_token / b_pcie  # s per token on Gen4: 2-bit 0.175, 3-bit 0.216
        assert r["roofline"] == pytest.approx(want, rel=1e-9), r["name"]  # one copy per load
        # every load a swap (ExpertCache._swap): the evicted expert back to the host, same bytes, after it
        assert r["predicted"] == pytest.approx(2 * want, rel=1e-9), r["name"]
        # compared in the kind's unit: the table's tokens/s as s per token
        published = float(r["published"].split(": ")[-1].split()[0])
        assert r["measured"] == pytest.approx(1 / published, rel=1e-12)
        assert r["unit"].startswith("s per output token") and r["inputs"]["b_pcie"] == src != r["source"]
        assert r["gamma_terms"]["f_e"] == pytest.approx(f_e, rel=1e-12)
    two_bit = next(r for r in rows if "2-bit" in r["name"])
    assert 8 * two_bit["gamma_terms"]["f_e"] == pytest.approx(3.12, abs=0.005)


def test_quantized_experts_rescale_only_the_offload_time():
    predictor = {
        "tool": "gamma",
        "quantity": "t_ep_overhead_s",
        "quantized_experts": {"model_size_GiB": 17.54, "model_size_fp16_experts_GiB": 85.16},
        "gamma": {"model": "mixtral-8x7b", "decode": True, "batch": 1, "expert_dtype": "fp16"},
    }
    with pytest.raises(ValueError, match="t_p_overhead_s"):
        ev.gamma_prediction(predictor)


def test_amx_prefill_rows_run_as_published(pub):
    v3 = [r for r in pub["end_to_end"]["rows"] if r["name"].startswith("KTransformers V0.3")]
    assert [r["measured"] for r in v3] == [185.96, 255.26, 252.58, 195.62]
    for r in v3:
        a = r["predictor"]["plan"]
        # dual socket (V0.3 Showcase), AMX int8 experts (V0.3-Preview Settings), the prompt in one pass
        assert (a["cpu_isa"], a["cpu_expert_dtype"], a.get("cpu_sockets", 2)) == ("amx", "int8", 2)
        assert a["tokens"] == a["context"] == r["settings"]["prompt_tokens"]
        assert a["host_dram_bw"] == 2 * 8 * 4800e6 * 8


def fake_plan(calls):
    """A stand-in for moelab.api.plan: EP at 2000 tokens/s per GPU, CPU experts at 10 tokens/s."""

    def plan(
        model,
        system,
        gpus,
        gpus_per_node,
        tokens=None,
        decode_batch=None,
        **kw,
    ):
        assert (tokens is None) != (decode_batch is None)
        calls.append(dict(model=model, system=system, gpus=gpus))
        if "cpu" in kw:
            return {
                "strategies": [
                    {
                        "name": "cpu-experts",
                        "feasible": True,
                        "tokens_per_s": 10.0,
                        "tokens_per_s_per_gpu": 10.0,
                    }
                ],
                "best": "cpu-experts",
            }
        return {
            "strategies": [
                {"name": "offload", "feasible": True, "tokens_per_s_per_gpu": 1.0, "tokens_per_s": 1.0},
                {
                    "name": "ep",
                    "feasible": True,
                    "tokens_per_s_per_gpu": 2000.0,
                    "tokens_per_s": 2000.0 * gpus,
                },
            ],
            "best": "ep",
        }

    return plan


def test_with_plan_each_row_is_predicted_from_its_stated_arguments(pub):
    calls = []
    rows = ev.end_to_end_rows(pub, plan=fake_plan(calls))
    specs = pub["end_to_end"]["rows"]
    # one call per plan row, one more at the roofline (engine "ideal") for a row with an engine,
    # and one more serially (micro_batches 1) for a row run with two-batch overlap
    assert len(calls) == sum(s["predictor"]["tool"] == "plan" for s in specs) + sum(
        s["predictor"].get("plan", {}).get("engine", "ideal") != "ideal" for s in specs) + sum(
        s["predictor"].get("plan", {}).get("micro_batches", 1) != 1 for s in specs)
    for r, spec in zip(rows, specs, strict=True):
        assert r["status"] == "predicted"
        if spec["predictor"]["tool"] != "plan":
            continue
        if spec["predictor"]["strategy"] == "ep":
            # per node (8 GPUs), per GPU (per_node 1) or the whole deployment (per_node null): 2000
            # tokens/s per GPU x the GPUs, over the share of tokens computed (hits are free)
            gpus = 8 if "per node" in spec["unit"] else 1 if "per GPU" in spec["unit"] else None
            assert spec["predictor"]["per_node"] == gpus
            gpus = gpus or spec["predictor"]["plan"]["gpus"]
            want = 2000.0 * gpus / (1 - spec["settings"].get("served_from_cache_share", 0.0))
        else:
            want = 10.0
        assert r["predicted"] == pytest.approx(want)
        assert r["error"] == pytest.approx(want / spec["measured"] - 1)
        assert r["roofline"] == pytest.approx(want)  # the fake plan has no engine: the same figure
    prod = next(r for r in rows if r["name"].startswith("DeepSeek prefill, production"))
    assert prod["predicted"] == pytest.approx(16000 / 0.437)


def test_a_failing_plan_is_recorded_not_raised(pub):
    from moelab.costmodel.specs import SpecError

    def plan(**kw):
        raise SpecError("system: unknown preset 'rtx-4090d'")

    rows = [r for r in ev.end_to_end_rows(pub, plan=plan) if r["predictor"]["tool"] == "plan"]
    assert rows and all(r["predicted"] is None and r["status"].startswith("prediction failed") for r in rows)


def test_the_experiment_writes_result_json_with_the_schema(tmp_path):
    out = runner.run_experiment("validation", root=tmp_path)
    result = json.loads((out.folder / "result.json").read_text())
    assert result["plan_available"] is hasattr(__import__("moelab.api", fromlist=["api"]), "plan")
    names = {(r["kind"], r["name"]) for r in result["rows"]}
    assert len(names) == len(result["rows"])
    for kind, s in result["stats"].items():
        tested = [
            abs(r["error"])
            for r in result["rows"]
            if r["kind"] == kind and r["error"] is not None and not r["fitted"]
        ]
        assert s["tested"] == len(tested)
        if tested:
            assert s["median_abs_error"] == pytest.approx(statistics.median(tested))
    section = (out.folder / "section.md").read_text()
    for phrase in ("pure RDMA", "PCIe Gen5", "leave-one-out", "End to end", "deepseek-day6"):
        assert phrase in section


def test_one_nvlink_domain_has_no_network_bound(pub):
    # GB200 NVL72: the 48 decode ranks share one NVLink domain, so no byte crosses a NIC and the
    # NIC bound does not apply; every other EP row keeps its bound.
    gb200 = next(r for r in pub["end_to_end"]["rows"] if "GB200" in r["name"])
    assert gb200["predictor"]["plan"]["decode_batch"] == 1408 * 48
    assert gb200["predictor"]["plan"]["gpus_per_node"] == gb200["settings"]["ep"] == 48
    names = {b["name"] for b in ev.network_bounds(pub, 49e9)}
    ep = {r["name"] for r in pub["end_to_end"]["rows"] if r["kind"] == "e2e-ep"}
    assert names == ep - {gb200["name"]}
