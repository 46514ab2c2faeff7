"""silicon: `moelab.plan` against measured TTFT/TPOT of vLLM, SGLang and TensorRT-LLM deployments.

The rows come from aiconfigurator-core's silicon sample (experiments/data/silicon_rows.csv,
extracted by experiments/data/extract_silicon.py; provenance in silicon_rows.json). Nothing is
fitted on them. Each aggregated-serving row of a preset model on a preset GPU that plan can
represent is predicted:

- GPUs R = tp x attention-DP (= moe_tp x moe_ep); experts fully expert-parallel (moe_ep = R)
  is the `ep` strategy, fully tensor-parallel (moe_tp = R) the `tp` strategy; attention all
  TP (tp = R) or all DP (attention_dp = R). A row without its attention-DP size gets
  moe_tp x moe_ep / tp where that is a whole number (the expert layout spans all GPUs;
  counted as `dp_inferred`). Anything else is skipped and counted by reason.
- TPOT = the decode step of the global batch B = batch_size x attention_dp at a context of
  isl + osl / 2 (the mean over the generation).
- TTFT = the mean over a serving run's requests (the rows are serving runs at concurrency B,
  not static batches; aiconfigurator's static mode, the `aic` column, counts one pass of all
  B prompts instead): the engine prefills at most its default token budget per step
  (efficiency.prefill_budget, sourced in engines/*.json); the first wave of B requests
  arrives together and request i completes with step ceil(i isl / budget); the later
  WAVES - 1 waves arrive in the groups those steps made, each group after half a decode
  step (phases.mean_serving_ttft; WAVES below). Each step's time is plan's prefill step for
  its tokens (all DP ranks' at once) at a context of isl.
- prediction = the strategy's `step_s`; roofline = its `bound_step_s` where plan reports it
  (else `step_s`: the two are the same model until the efficiency layer lands).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

NAME = "silicon"
SUMMARY = "plan's TPOT/TTFT against 1,370 measured vLLM/SGLang/TRT-LLM rows (aiconfigurator-core sample)"
VERSION = "2"
DEPENDS = (
    "moelab.api",
    "moelab.costmodel.plan",
    "moelab.costmodel.phases",
    "moelab.costmodel.memory",
    "moelab.costmodel.closed_form",
    "moelab.costmodel.presets",
    "moelab.costmodel.specs",
)
DATA = Path(__file__).resolve().parent / "data"
ROWS = DATA / "silicon_rows.csv"
GOALS = {"tpot": {"median": 0.12, "p90": 0.30}, "ttft": {"median": 0.20, "p90": 0.30}}
EXPERT_DTYPE = {"fp8": "fp8", "fp8_block": "fp8", "nvfp4": "nvfp4"}
ENGINE = {"vllm": "vllm", "sglang": "sglang", "trtllm": "trtllm"}  # row backend -> plan's engine=
# GB200's NVLink domain is the NVL72 rack, not the 4-GPU compute tray (the preset's description).
NVLINK_DOMAIN = {"gb200": 72}
BY = ("all", "backend", "system", "model", "batch_range", "strategy")  # the error tables' groupings
BATCH_RANGES = ((1, 7), (8, 31), (32, 127), (128, 511), (512, None))
QUICK_ROWS = 8  # api.plan also runs the closed-form gamma (~0.6 s a prefill pass): keep CI short
# Prompts per run = WAVES x concurrency: the silicon sample records the concurrency
# (silicon_concurrency=C) but not the prompt count. 10 x C is the convention of the public
# InferenceMAX harness (InferenceMAX/InferenceMAX benchmarks/dsr1_fp8_h200_trt_slurm.sh and the
# other benchmarks/*.sh, commit ff7e462: benchmark_serving.py with
# --num-prompts $(( $CONC * 10 )) --max-concurrency $CONC --request-rate inf --ignore-eos),
# taken as the stand-in for NVIDIA's unpublished one. WAVES = 1 is the burst alone.
WAVES = 10


def INPUTS(cfg):
    from moelab.experiments.runner import preset_files

    return [ROWS, DATA / "silicon_rows.json", *preset_files(*sorted({"deepseek-r1", "deepseek-v3",
                                                                    "gpt-oss-120b", "qwen3-235b-a22b"}))]


def config(quick: bool) -> dict:
    return {"rows": "experiments/data/silicon_rows.csv", "quick_rows": QUICK_ROWS if quick else None,
            "context": "isl + osl // 2", "ttft": "mean over WAVES x B requests, engine token budget",
            "waves": WAVES, "kv_dtype": "bf16",
            "goals": GOALS}


def STEPS(cfg) -> int:
    return 3


# --- rows and what plan makes of them ------------------------------------------------------------


def load_rows(path: Path = ROWS) -> list[dict]:
    import csv

    ints = ("isl", "osl", "batch_size", "tp_size", "pp_size", "attention_dp_size", "moe_tp_size",
            "moe_ep_size")
    floats = ("silicon_ttft_ms", "silicon_tpot_ms", "aic_ttft_ms", "aic_tpot_ms")
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in ints:
                r[k] = int(r[k]) if r.get(k) not in (None, "") else None
            for k in floats:
                r[k] = float(r[k]) if r.get(k) not in (None, "") else None
            out.append(r)
    return out


QUICK_MAX_PREFILL = 8192  # tokens: plan's gamma search (api.plan) takes seconds for larger passes


def quick_subset(rows: list[dict], n: int) -> list[dict]:
    """n rows spread evenly over the file (its order: by id) among those whose TTFT pass is at
    most QUICK_MAX_PREFILL tokens, for CI."""
    small = [r for r in rows if (r["batch_size"] or 0) * (r["attention_dp_size"] or 1) * (r["isl"] or 0)
             <= QUICK_MAX_PREFILL]
    step = max(1, len(small) // n)
    return small[::step][:n]


class Skip(Exception):
    """A row plan cannot represent; the message is the reason it is counted under."""


def represent(row: dict) -> dict:
    """The row as plan's arguments: strategy, attention, GPUs, dtypes, decode batch and context."""
    tp, dp, etp, ep = (row[k] for k in ("tp_size", "attention_dp_size", "moe_tp_size", "moe_ep_size"))
    inferred = dp is None and None not in (tp, etp, ep) and tp > 0 and (etp * ep) % tp == 0
    if inferred:  # the expert layout spans all GPUs: tp x DP = moe_tp x moe_ep gives the DP size
        dp = etp * ep // tp
    if None in (tp, dp, etp, ep, row["isl"], row["osl"], row["batch_size"]):
        raise Skip("incomplete parallelism or lengths")
    if (row["pp_size"] or 1) != 1:
        raise Skip("pipeline parallelism")
    gpus = tp * dp
    if etp * ep != gpus:
        raise Skip("expert GPUs != attention GPUs")
    if gpus > 1 and etp > 1 and ep > 1:
        raise Skip("experts TP x EP mixed")
    if gpus > 1 and tp > 1 and dp > 1:
        raise Skip("attention TP x DP mixed")
    dtype = EXPERT_DTYPE.get(row["moe_quant_mode"])
    if dtype is None:
        raise Skip(f"expert dtype {row['moe_quant_mode']}")
    strategy = "tp" if gpus > 1 and etp == gpus else "ep"
    attention = "data-parallel attention" if gpus > 1 and dp == gpus else "tensor-parallel attention"
    batch = row["batch_size"] * dp  # batch_size is per attention-DP rank
    kw = {"model": row["model"], "system": row["system"], "gpus": gpus, "expert_dtype": dtype,
          "kv_dtype": "bf16"}
    if row["system"] in NVLINK_DOMAIN:
        kw["gpus_per_node"] = min(gpus, NVLINK_DOMAIN[row["system"]])
    return {"strategy": strategy, "attention": attention, "batch": batch, "dp": dp, "dp_inferred": inferred,
            "context": row["isl"] + row["osl"] // 2, "plan": kw}


def engine_kwargs(backend: str, plan_fn) -> dict:
    """engine= for plan when it accepts the argument (the efficiency layer adds it)."""
    import inspect

    params = inspect.signature(plan_fn).parameters
    return {"engine": ENGINE[backend]} if "engine" in params and backend in ENGINE else {}


def predict(row: dict, plan_fn=None) -> dict:
    """Predicted and roofline TPOT and TTFT (ms) for one row; raises Skip."""
    from moelab.costmodel.phases import mean_serving_ttft

    if plan_fn is None:
        from moelab.api import plan as plan_fn
    rep = represent(row)
    kw = {**rep["plan"], **engine_kwargs(row["backend"], plan_fn)}
    out = {"strategy": rep["strategy"], "attention": rep["attention"], "batch": rep["batch"],
           "dp_inferred": rep["dp_inferred"],
           "gpus": kw["gpus"], "engine": kw.get("engine", "")}
    s = _strategy(plan_fn, rep["strategy"], **kw, decode_batch=rep["batch"], context=rep["context"])
    if not s["feasible"]:
        raise Skip(f"plan: tpot {s['reason'].split(':')[0]}")
    out["tpot_pred_ms"] = 1e3 * s["step_s"]
    out["tpot_roofline_ms"] = 1e3 * (s.get("bound_step_s") or s["step_s"])
    out["tpot_plan_attention"] = s.get("attention", "")
    # TTFT: the mean over the burst's requests under the engine's token budget per step
    dp, isl = rep["dp"], row["isl"]
    budget = prefill_budget(kw.get("engine"), row["system"], dp)
    steps = {}

    def step(tokens_per_rank: int) -> dict:  # one prefill step: the DP ranks' tokens at once
        if tokens_per_rank not in steps:
            got = _strategy(plan_fn, rep["strategy"], **kw, tokens=tokens_per_rank * dp, context=isl)
            if not got["feasible"]:
                raise Skip(f"plan: ttft {got['reason'].split(':')[0]}")
            steps[tokens_per_rank] = got
        return steps[tokens_per_rank]
    requests = row["batch_size"]  # per DP rank
    for col, key, decode in (("pred", "step_s", s["step_s"]),
                             ("roofline", "bound_step_s", s.get("bound_step_s") or s["step_s"])):
        out[f"ttft_{col}_ms"] = 1e3 * mean_serving_ttft(
            lambda t, key=key: step(t).get(key) or step(t)["step_s"], requests, isl, budget, WAVES, decode)
    out["ttft_plan_attention"] = step(min(requests * isl, budget or requests * isl)).get("attention", "")
    out["prefill_budget"] = budget or 0
    return out


def prefill_budget(engine: str | None, system: str, dp: int) -> int | None:
    """Prompt tokens per step of one DP rank under the engine's default (None: one pass)."""
    if not engine:
        return None
    from moelab.costmodel.predict import efficiency
    from moelab.costmodel.presets import load_system

    return efficiency.prefill_budget(engine, load_system(system).hbm_bytes, dp)[0]


@functools.lru_cache(maxsize=4096)
def _cached_strategy(plan_fn, name: str, items: tuple) -> dict:
    report = plan_fn(**dict(items))
    return next(x for x in report["strategies"] if x["name"] == name)


def _strategy(plan_fn, name: str, **kw) -> dict:
    """The named strategy of plan(**kw); rows measured on several engines or versions with the
    same deployment ask the same question (while no engine= is passed), so answers are kept."""
    return _cached_strategy(plan_fn, name, tuple(sorted(kw.items())))


# --- statistics ----------------------------------------------------------------------------------


def batch_range(b: int) -> str:
    for lo, hi in BATCH_RANGES:
        if b >= lo and (hi is None or b <= hi):
            return f"{lo}-{hi}" if hi else f">={lo}"
    raise ValueError(b)


def abs_errors(pred, meas) -> list[float]:
    return [abs(p / m - 1) for p, m in zip(pred, meas, strict=True)]


def median_p90(errors: list[float]) -> dict:
    """Median and 90th percentile (linear interpolation between order statistics)."""
    import numpy as np

    if not errors:
        return {"n": 0, "median": None, "p90": None}
    e = np.asarray(errors, dtype=float)
    return {"n": int(e.size), "median": float(np.median(e)), "p90": float(np.percentile(e, 90))}


# series -> (the column predicted, a column that must be present): the anchor compares plan and
# aiconfigurator on the same rows.
SERIES = {"pred": ("{phase}_pred_ms", None), "roofline": ("{phase}_roofline_ms", None),
          "aic": ("aic_{phase}_ms", None), "pred_on_aic_rows": ("{phase}_pred_ms", "aic_{phase}_ms")}


def error_tables(records: list[dict]) -> dict:
    """{phase: {by: {group: {series: {n, median, p90}}}}}, by one of BY."""
    tables = {}
    for phase in ("tpot", "ttft"):
        meas = f"silicon_{phase}_ms"
        per = {}
        for by in BY:
            groups = {}
            for r in records:
                groups.setdefault("all" if by == "all" else r[by], []).append(r)
            per[by] = {}
            order = [batch_range(lo) for lo, _ in BATCH_RANGES] if by == "batch_range" else sorted(groups)
            for g in [g for g in order if g in groups]:
                rs = groups[g]
                per[by][g] = {}
                for series, (col, also) in SERIES.items():
                    col, also = col.format(phase=phase), (also or col).format(phase=phase)
                    have = [r for r in rs if r.get(col) is not None and r.get(also) is not None]
                    per[by][g][series] = median_p90(abs_errors([r[col] for r in have],
                                                               [r[meas] for r in have]))
        tables[phase] = per
    return tables


def goal_check(tables: dict) -> dict:
    out = {}
    for phase, goals in GOALS.items():
        got = tables[phase]["all"]["all"]["pred"]
        for stat, limit in goals.items():
            v = got[stat]
            out[f"{phase}_{stat}"] = {"value": v, "goal": limit,
                                      "pass": v is not None and v <= limit}
    return out


# --- the run -------------------------------------------------------------------------------------


def run(cfg: dict, ctx) -> None:
    import json

    rows = load_rows()
    if cfg["quick_rows"]:
        rows = quick_subset(rows, cfg["quick_rows"])
    provenance = json.loads((DATA / "silicon_rows.json").read_text())
    records, skipped = [], {}
    for row in rows:
        try:
            p = predict(row)
        except Skip as why:
            skipped[str(why)] = skipped.get(str(why), 0) + 1
            continue
        keep = {k: row[k] for k in ("id", "backend", "backend_version", "model", "system", "isl", "osl",
                                    "batch_size", "tp_size", "attention_dp_size", "moe_tp_size",
                                    "moe_ep_size", "silicon_ttft_ms", "silicon_tpot_ms")}
        keep.update({k: row.get(k) for k in ("aic_ttft_ms", "aic_tpot_ms")})
        rec = {**keep, **p, "batch_range": batch_range(p["batch"])}
        for phase in ("tpot", "ttft"):
            m = row[f"silicon_{phase}_ms"]
            rec[f"{phase}_error"] = rec[f"{phase}_pred_ms"] / m - 1
            rec[f"{phase}_roofline_error"] = rec[f"{phase}_roofline_ms"] / m - 1
        records.append(rec)
    ctx.advance()
    ctx.rows("silicon", records)
    tables = error_tables(records)
    goals = goal_check(tables)
    attention_match = sum(r["tpot_plan_attention"] == r["attention"] for r in records)
    result = {"rows_in_csv": len(load_rows()), "rows_considered": len(rows), "predicted": len(records),
              "skipped": dict(sorted(skipped.items())), "disaggregated_not_extracted":
              provenance["counts"]["by_mode"].get("disagg", 0), "errors": tables, "goals": goals,
              "attention_as_measured": attention_match, "provenance": provenance,
              "attention_dp_inferred": sum(bool(r["dp_inferred"]) for r in records)}
    ctx.json("silicon_errors.json", result)
    ctx.summary.update({f"{k}_pass": v["pass"] for k, v in goals.items()})
    ctx.summary.update({"predicted": len(records), "skipped": sum(skipped.values())})
    if records:
        _plot_scatter(ctx, records)
        _plot_log_ratio(ctx, records)
    ctx.advance()
    ctx.section(_section(result, records))
    ctx.advance()


def _fmt_pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _table(tables: dict, phase: str, by: str) -> str:
    series = [s for s in SERIES if any(v[s]["n"] for v in tables[phase][by].values())]
    head = f"| {by} | rows | " + " | ".join(f"{s} median / p90" for s in series) + " |\n"
    head += "|---|---|" + "---|" * len(series) + "\n"
    for g, v in tables[phase][by].items():
        head += (f"| {g} | {v['pred']['n']} | "
                 + " | ".join(f"{_fmt_pct(v[s]['median'])} / {_fmt_pct(v[s]['p90'])}" for s in series)
                 + " |\n")
    return head


def _section(result: dict, records: list[dict]) -> str:
    t, g = result["errors"], result["goals"]
    goals = "\n".join(f"- {k.replace('_', ' ')}: {_fmt_pct(v['value'])} against <= {_fmt_pct(v['goal'])}: "
                      f"**{'pass' if v['pass'] else 'miss'}**" for k, v in g.items())
    skipped = "\n".join(f"- {k}: {v}" for k, v in result["skipped"].items()) or "- none"
    aic_rows = sum(r.get("aic_tpot_ms") is not None for r in records)
    anchor = (f"aiconfigurator's own static estimate (column `aic`) is there for {aic_rows} of the "
              "predicted rows, computed by the extraction script with the package's estimator; "
              "`pred_on_aic_rows` is plan on the same rows."
              if aic_rows else
              "aiconfigurator's own estimate is not in the extracted CSV (the extraction script adds it "
              "with `--aic`; see docs/validation.md).")
    prov = result["provenance"]
    tables = "\n\n".join(f"**{phase.upper()} by {by}**\n\n{_table(t, phase, by)}"
                         for phase in ("tpot", "ttft") for by in BY)
    ratio = {ph: _median_ratio(records, ph) for ph in ("tpot", "ttft")}
    return f"""
Measured TPOT and TTFT of {prov['package']} {prov['version']}'s silicon sample ({prov['license']};
{prov['counts']['rows_in_file']:,} rows): {result['rows_in_csv']:,} aggregated-serving rows of preset
models on preset GPUs extracted ({result['disaggregated_not_extracted']:,} disaggregated rows left out).
Of the {result['rows_considered']:,} rows considered, plan predicts {result['predicted']:,}; nothing is
fitted on them. TPOT = the decode step of the global batch at context isl + osl/2; TTFT = the
mean over a run of {WAVES} x B requests under the engine's default token budget per step (first
wave together, later ones in the groups it made; docs/validation.md). `pred` = plan's `step_s`,
`roofline` = its `bound_step_s`, |error| = |predicted / measured - 1|. Plan
chose the measured attention layout (TP or DP) on {result['attention_as_measured']} of the predicted
rows; {result['attention_dp_inferred']} rows lacked their attention-DP size and got moe_tp x moe_ep /
tp. The median predicted / measured ratio is {ratio['tpot']:.2f} for TPOT and {ratio['ttft']:.2f} for
TTFT: below 1, plan is faster than the engines.

{anchor}

Goals (prediction, all rows):

{goals}

Rows not predicted, by reason:

{skipped}

{tables}
"""


def _median_ratio(records, phase: str) -> float:
    import numpy as np

    logs = [math.log(r[f"{phase}_pred_ms"] / r[f"silicon_{phase}_ms"]) for r in records]
    return float(np.exp(np.median(logs))) if logs else math.nan


def _plot_scatter(ctx, records) -> None:
    from moelab.experiments import plots

    fig, axes = plots.figure(ncols=2, width=10, height=4.6)
    for ax, phase in zip(axes, ("tpot", "ttft"), strict=True):
        lo = min(min(r[f"silicon_{phase}_ms"], r[f"{phase}_pred_ms"]) for r in records)
        hi = max(max(r[f"silicon_{phase}_ms"], r[f"{phase}_pred_ms"]) for r in records)
        for i, backend in enumerate(sorted({r["backend"] for r in records})):
            rs = [r for r in records if r["backend"] == backend]
            ax.loglog([r[f"silicon_{phase}_ms"] for r in rs], [r[f"{phase}_pred_ms"] for r in rs], "o",
                      ms=3, alpha=0.6, color=plots.SERIES_COLORS[i], label=backend)
        ax.loglog([lo, hi], [lo, hi], color=plots.GUIDE_COLOR, lw=1, label="predicted = measured")
        for f in (0.7, 1.3):  # |predicted / measured - 1| = 30%
            ax.loglog([lo, hi], [lo * f, hi * f], color=plots.GUIDE_COLOR, lw=0.8, ls=":",
                      label="±30%" if f > 1 else "_")
        ax.set_xlabel(f"measured {phase.upper()} [ms]")
        ax.set_ylabel(f"plan's {phase.upper()} [ms]")
        ax.set_title(f"{phase.upper()}: {len(records)} rows", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    ctx.plot(fig, "predicted_vs_measured", "plan's TPOT and TTFT against the measured ones (log axes), "
             "per serving engine, with the ±30% band.")


def _plot_log_ratio(ctx, records) -> None:
    from moelab.experiments import plots

    fig, axes = plots.figure(ncols=2, width=10, height=4.2)
    for ax, phase in zip(axes, ("tpot", "ttft"), strict=True):
        for i, (series, (col, also)) in enumerate(SERIES.items()):
            if also:
                continue
            col = col.format(phase=phase)
            x = [math.log(r[col] / r[f"silicon_{phase}_ms"]) for r in records if r.get(col)]
            if x and not (series == "roofline" and all(r[col] == r[f"{phase}_pred_ms"] for r in records)):
                ax.hist(x, bins=40, histtype="step", lw=1.4, color=plots.SERIES_COLORS[i],
                        label=f"{series} ({len(x)})")
        ax.axvline(0, color=plots.GUIDE_COLOR, lw=1)
        ax.set_xlabel(f"log(predicted / measured) {phase.upper()} [ln ratio]")
        ax.set_ylabel("rows [count]")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    ctx.plot(fig, "log_ratio", "Distribution of log(predicted / measured): 2x and 1/2x sit at the same "
             "distance from 0 (the roofline is drawn only where it differs from the prediction).")
