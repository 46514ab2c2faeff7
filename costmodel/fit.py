"""`moelab fit`: a user's own benchmark runs against moelab's prediction, and an engine
profile's factors fitted to them.

Each run (costmodel/engine_results.py) is predicted pass by pass with the planner
(`moelab.plan`): the strategy that matches the engine's deployment gives a step time and its
terms (compute_s, stream_s, cpu_s, ...). A profile multiplies each term by scale[term] before
the strategy combines them (`combine`, the same sums and maxima as costmodel/plan.py), then
adds per_step_s + per_layer_s x layers. A run informs the factor of the term that dominates
its predicted time (at least half of the summed terms); a factor is fitted only from the runs
it dominates, by least squares on log(measured / predicted). docs/fit.md has the details.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from moelab.costmodel.engine_results import Run
from moelab.costmodel.predict.profile import VERSION, load_profile
from moelab.costmodel.specs import SpecError

# A GGUF file's weights on the GPU, as the planner's GPU dtype of about the same bytes per weight:
# Q4_K is 4.5 bits like nvfp4, Q8_0 8.5 bits, nearest fp8's 8 (the GPU dtypes have no int4/int8).
GPU_DTYPE = {"int4": "nvfp4", "int8": "fp8", "bf16": "bf16"}
DOMINANT = 0.5  # a run informs a factor when that term is at least half of its summed terms
# The planner's strategies each engine can run, where the file does not say which it ran
# (costmodel/predict's engine names; moelab/engines.py emits their flags).
ENGINE_STRATEGIES = {"vllm": ("ep", "tp", "offload"), "sglang": ("ep", "tp"), "trtllm": ("ep", "tp")}


def combine(strategy: str, terms: dict) -> float:
    """A strategy's step from its terms, joined as the planner joins them
    (`plan.strategy_step`): the fit tries thousands of candidate scales on the terms of one
    planner run instead of re-running the planner."""
    from moelab.costmodel.plan import strategy_step

    return strategy_step(strategy, terms)[0]


def apply_profile(strategy: str, terms: dict, layers: int, profile: dict | None) -> float:
    """The step of one pass under a profile's scale and fixed costs (None: the terms' own step)."""
    if not profile:
        return combine(strategy, terms)
    scale = profile.get("scale", {})
    fixed = profile.get("fixed", {})
    scaled = {k: v * scale.get(k, 1.0) for k, v in terms.items()}
    return combine(strategy, scaled) + fixed.get("per_step_s", 0.0) + fixed.get("per_layer_s", 0.0) * layers


# --- the model a run names ---------------------------------------------------------------------


def preset_for(model_id: str) -> str | None:
    """The preset or config.json a file's model id names: a local config path, a preset of
    that name (an HF id's last part, lowercased), or the preset whose source is that HF id."""
    from pathlib import Path

    from moelab.costmodel.presets import PRESETS, model_names

    p = Path(model_id)
    try:
        if p.is_dir() and (p / "config.json").is_file():
            return str(p / "config.json")
        if p.suffix == ".json" and p.is_file():
            return str(p)
    except (OSError, ValueError):  # a name too long for a path, or with a NUL: not a path
        pass
    names = model_names()
    base = model_id.rstrip("/").split("/")[-1].lower()
    if base in names:
        return base
    pattern = re.compile(r"huggingface\.co/" + re.escape(model_id.strip("/")) + r"(?![\w.-])", re.I)
    for name in names:
        if pattern.search((PRESETS / "models" / f"{name}.json").read_text()):
            return name
    return None


# --- predictions ---------------------------------------------------------------------------------


@dataclass
class Setup:
    """What the files lack, from the command line (moelab plan's flags)."""
    system: str
    cpu: str
    model: str | None = None
    gpus: int | None = None
    engine: str | None = None  # whose efficiencies predict the runs [each run's own engine]
    tp: int | None = None      # --tp / --ep: the parallelism of runs whose file does not record it
    ep: int | None = None
    expert_dtype: str | None = None      # [the file's (llama-bench), else the config's]
    cpu_expert_dtype: str | None = None  # [the file's, else int8]
    kv_dtype: str = "bf16"
    host_mem: float = 2000e9


@dataclass
class Prediction:
    model: str
    gpus: int
    strategy: str
    parts: list = field(default_factory=list)  # (count, strategy, terms, layers, step_s, bound_s)
    terms: dict = field(default_factory=dict)   # count-weighted sum over the passes
    step_s: float = 0.0
    bound_s: float = 0.0
    informs: list = field(default_factory=list)
    dominant_share: float = 0.0

    def under(self, profile: dict | None) -> float:
        return sum(c * apply_profile(s, t, layers, profile) for c, s, t, layers, _, _ in self.parts)


def predict_run(run: Run, setup: Setup, plan: Callable, profile: dict | None = None) -> Prediction | None:
    """moelab's prediction of a run with its engine's efficiencies (and a profile on top, if
    given), pass by pass with `plan` (`moelab.plan`, passed in: the cost model does not import
    the API above it); None, with run.skip set, when the strategy does not fit this hardware.
    A model that is no MoE, or none at all, is an error."""
    from moelab.costmodel.presets import load_model

    if run.skip:
        return None
    model = (preset_for(run.model) if run.model else None) or setup.model
    if model is None:
        named = f"names model {run.model!r}, which is no preset or config.json" if run.model \
            else "names no model"
        raise SpecError(f"result file: {run.file} {run.label} {named}: give --model")
    try:
        spec = load_model(model)
    except SpecError as e:
        raise SpecError(f"result file: {run.file} {run.label}: model {model}: {e}") from None
    gpus = run.gpus or setup.gpus or 1
    if run.expert_dtype and not setup.expert_dtype:
        cpu_dtype = setup.cpu_expert_dtype or run.expert_dtype
        note = (f"predicted with expert_dtype {GPU_DTYPE[run.expert_dtype]} on the GPU, "
                f"cpu_expert_dtype {cpu_dtype} (the file's {run.expert_dtype})")
        if note not in run.notes:
            run.notes.append(note)
    layers = spec.n_layers or spec.n_moe_layers

    def plan_pass(p):
        kw = dict(decode_batch=p.n) if p.decode else dict(tokens=p.n)
        return plan(model, setup.system, gpus=gpus, cpu=setup.cpu, context=p.context,
                    expert_dtype=setup.expert_dtype or GPU_DTYPE.get(run.expert_dtype),
                    cpu_expert_dtype=setup.cpu_expert_dtype or run.expert_dtype or "int8",
                    kv_dtype=setup.kv_dtype, host_mem=setup.host_mem,
                    engine=setup.engine or run.engine, profile=profile, **kw)

    if not run.chosen:  # once, without the profile: re-predictions keep the deployment
        _choose_strategy(run, setup, spec, gpus, plan_pass)
        if run.skip:
            return None
    strategy = run.strategy
    pred = Prediction(model=model, gpus=gpus, strategy=strategy)
    for p in run.passes:
        r = plan_pass(p)
        s = next(x for x in r["strategies"] if x["name"] == strategy)
        if not s["feasible"]:
            run.skip = f"does not fit: moelab's {strategy} ({run.why}) at this pass: {s['reason']}"
            return None
        pred.parts.append((p.count, strategy, s["terms"], layers, s["step_s"], s["bound_step_s"]))
        for k, v in s["terms"].items():
            pred.terms[k] = pred.terms.get(k, 0.0) + p.count * v
        pred.step_s += p.count * s["step_s"]
        pred.bound_s += p.count * s["bound_step_s"]
    total = sum(pred.terms.values())
    top = max(pred.terms, key=pred.terms.get)
    pred.dominant_share = pred.terms[top] / total if total > 0 else 0.0
    pred.informs = [top] if pred.dominant_share >= DOMINANT else []
    return pred


def _choose_strategy(run: Run, setup: Setup, spec, gpus: int, plan_pass: Callable) -> None:
    """Set run.strategy (and run.why, a note) to the planner strategy the engine ran: the
    file's record (engine_results), else --tp/--ep, else the best feasible one the planner
    ranks of those the engine runs; a recorded serving strategy that does not fit this hardware
    falls back to that best one (said why). llama.cpp's n_cpu_moe below the MoE layers is the
    hybrid. run.skip says so where nothing the engine runs fits."""
    from moelab.costmodel.engine_results import serving_strategy

    if run.strategy is None and (setup.tp or setup.ep):
        run.strategy, why = serving_strategy(setup.tp or setup.ep, setup.ep)
        flags = " ".join(f"--{k} {v}" for k, v in (("tp", setup.tp), ("ep", setup.ep)) if v)
        run.why = f"{flags}: {why}"
    if run.cpu_moe_layers and run.cpu_moe_layers < spec.n_moe_layers:
        run.strategy = "hybrid"
        run.why = (f"n_cpu_moe {run.cpu_moe_layers} of {spec.n_moe_layers} MoE layers: moelab's hybrid, "
                   "which picks its own split of experts between GPU and CPU")
    main = max(run.passes, key=lambda p: p.count)  # the pass that takes most of the run
    ranked = plan_pass(main)["strategies"]  # feasible first, then by tokens/s per GPU
    allowed = ENGINE_STRATEGIES.get(run.engine)
    if allowed is None:  # llama.cpp: the strategy its flags name, or it does not fit
        s = next(x for x in ranked if x["name"] == run.strategy)
        if not s["feasible"]:
            run.skip = f"does not fit: moelab's {run.strategy} ({run.why}): {s['reason']}"
    else:
        # One GPU: tp is ep. Several: one instance spans them (ep or tp); the planner's offload
        # is one-GPU instances side by side, which is not the run the file measured.
        allowed = tuple(a for a in allowed if a != ("tp" if gpus == 1 else "offload"))
        recorded = next((x for x in ranked if x["name"] == run.strategy), None)
        if recorded is None or not recorded["feasible"]:
            best = next((x for x in ranked if x["feasible"] and x["name"] in allowed), None)
            if best is None:
                why = "; ".join(f"{x['name']}: {x['reason']}" for x in ranked if x["name"] in allowed)
                run.skip = f"does not fit: no strategy {run.engine} runs fits this hardware: {why}"
                return
            if recorded is None:
                run.why = f"{run.why}: the best feasible the planner ranks of {', '.join(allowed)}"
            else:
                run.why = (f"{run.why}, which does not fit here ({recorded['reason']}): the best feasible "
                           f"the planner ranks of {', '.join(allowed)}")
            run.strategy = best["name"]
    run.chosen = True
    run.notes.append(f"strategy {run.strategy}: {run.why}")


# --- the fit -------------------------------------------------------------------------------------


@dataclass
class Fit:
    scale: dict        # fitted factors only; every other term stays at 1
    uncertainty: dict  # term -> standard error of log(scale) (~ its relative std), None under 3 runs
    runs_per_term: dict
    residuals: list    # log(measured / predicted) per run after the fit (None: not predicted)
    refused: dict = field(default_factory=dict)  # term -> why it was not fitted


def fit_scales(measured: list[float], informs: list[list[str]],
               predict: Callable[[int, dict], float]) -> Fit:
    """Factors for the informed terms: for each, the scale minimising the squared log residuals
    of the runs it informs, the others held (a few sweeps, for runs that mix terms).
    `predict(i, profile)` is run i's predicted time under a profile {"scale": {...}}."""
    from scipy.optimize import minimize_scalar

    by_term: dict[str, list[int]] = {}
    for i, terms in enumerate(informs):
        for t in terms:
            by_term.setdefault(t, []).append(i)
    # A factor whose term leaves every prediction it would fit unchanged (a term of 0, or the
    # smaller side of a max) has no minimum: the search would drift to its bound. Refuse it.
    refused = {}
    for t in sorted(by_term):
        if all(predict(i, {"scale": {t: 2.0}}) == predict(i, {"scale": {}}) for i in by_term[t]):
            refused[t] = f"doubling {t} leaves the prediction of its {len(by_term[t])} run(s) unchanged"
            del by_term[t]
    scale = {t: 1.0 for t in by_term}

    def sq(t, x):
        prof = {"scale": {**scale, t: math.exp(x)}}
        return sum((math.log(measured[i]) - math.log(predict(i, prof))) ** 2 for i in by_term[t])

    for _ in range(8):
        change = 0.0
        for t in sorted(by_term):
            x = minimize_scalar(lambda x, t=t: sq(t, x), bounds=(-12, 12), method="bounded",
                                options={"xatol": 1e-10}).x
            change = max(change, abs(x - math.log(scale[t])))
            scale[t] = math.exp(x)
        if change < 1e-8:
            break
    uncertainty = {}
    for t, idx in by_term.items():
        if len(idx) < 3:
            uncertainty[t] = None
            continue
        # One parameter in log space: se = residual std / sqrt(sum of squared elasticities),
        # the elasticity d log(pred) / d log(scale) by a central difference.
        prof = {"scale": dict(scale)}
        res = [math.log(measured[i] / predict(i, prof)) for i in idx]
        h = 1e-4

        def log_pred(i, dx, t=t):
            return math.log(predict(i, {"scale": {**scale, t: scale[t] * math.exp(dx)}}))
        el = [(log_pred(i, h) - log_pred(i, -h)) / (2 * h) for i in idx]
        s2 = sum(r * r for r in res) / (len(idx) - 1)
        uncertainty[t] = math.sqrt(s2 / sum(e * e for e in el)) if any(el) else None
    prof = {"scale": dict(scale)}
    residuals = [math.log(m / predict(i, prof)) for i, m in enumerate(measured)]
    return Fit(scale=scale, uncertainty=uncertainty, runs_per_term={t: len(v) for t, v in by_term.items()},
               residuals=residuals, refused=refused)


def make_profile(engine: str, fit: Fit, fitted_from: list[dict], source: str) -> dict:
    """The profile `moelab plan --profile` reads (checked by its own loader before it is written)."""
    profile = {"moelab_profile": VERSION, "engine": engine,
            "scale": {t: fit.scale[t] for t in sorted(fit.scale)},
            "fixed": {"per_step_s": 0.0, "per_layer_s": 0.0},
            "uncertainty": {t: fit.uncertainty.get(t) for t in sorted(fit.scale)},
            "fitted_from": fitted_from, "source": source}
    load_profile(profile)
    return profile
