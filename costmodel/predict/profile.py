"""A user profile: factors fitted on one's own measurements (`moelab fit` writes it,
`moelab plan --profile FILE` reads it).

    {"moelab_profile": 1, "engine": "vllm",
     "scale": {"compute_s": 1.2, "ep_latency_s": 0.8},
     "fixed": {"per_step_s": 0.002, "per_layer_s": 1e-5},
     "uncertainty": {...}, "fitted_from": [...], "source": "..."}

Each predicted term of a strategy (a key of its `terms`) is multiplied by scale[term]
(missing: 1) before the strategy combines its terms (sums, max, overlap); then
per_step_s + per_layer_s x layers is added to the step. `uncertainty` and `fitted_from` are
carried as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import PurePath

from moelab.costmodel.specs import SpecError

VERSION = 1
# The terms a strategy reports (costmodel/plan.py); a profile may scale only these.
TERMS = ("compute_s", "tp_allreduce_s", "network_s", "nvlink_s", "ep_latency_s", "stream_s",
         "link_s", "cpu_s", "gpu_experts_s")
ENGINES = ("ideal", "vllm", "sglang", "trtllm", "ktransformers", "llama.cpp")
FIXED = ("per_step_s", "per_layer_s")


@dataclass(frozen=True)
class Profile:
    engine: str
    scale: dict = field(default_factory=dict)  # term -> factor > 0
    per_step_s: float = 0.0
    per_layer_s: float = 0.0
    uncertainty: dict | None = None
    fitted_from: list | None = None
    source: str = ""
    path: str = ""  # where it was read from ("" for a dict)

    def factor(self, term: str) -> float:
        return self.scale.get(term, 1.0)

    def fixed_s(self, layers: int) -> float:
        return self.per_step_s + self.per_layer_s * layers

    def to_dict(self) -> dict:
        return {"moelab_profile": VERSION, "engine": self.engine, "scale": dict(self.scale),
                "fixed": {"per_step_s": self.per_step_s, "per_layer_s": self.per_layer_s},
                **({"uncertainty": self.uncertainty} if self.uncertainty is not None else {}),
                **({"fitted_from": self.fitted_from} if self.fitted_from is not None else {}),
                "source": self.source, **({"path": self.path} if self.path else {})}


def _number(v, what: str, where: str, positive: bool) -> float:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (v <= 0 if positive else v < 0):
        raise SpecError(f"profile: {where}: {what} must be a finite number {'> 0' if positive else '>= 0'}, "
                        f"got {v!r}")
    return float(v)


def load_profile(src) -> Profile:
    """A Profile from a path (str or Path) or an already-read dict; one SpecError line if bad."""
    if isinstance(src, Profile):
        return src
    if isinstance(src, dict):
        data, where = src, "the profile dict"
    elif isinstance(src, str | PurePath):
        from moelab.costmodel.jsonfile import read_json

        data, where = read_json(src, "profile"), str(src)
    else:
        raise SpecError(f"profile: give a path or a JSON object, got {type(src).__name__}")
    if not isinstance(data, dict):
        raise SpecError(f"profile: {where} must hold a JSON object, got {type(data).__name__}")
    if data.get("moelab_profile") != VERSION:
        raise SpecError(f"profile: {where} is not a moelab profile (needs \"moelab_profile\": {VERSION}, "
                        f"got {data.get('moelab_profile')!r})")
    known = {"moelab_profile", "engine", "scale", "fixed", "uncertainty", "fitted_from", "source", "path"}
    extra = sorted(set(data) - known)
    if extra:
        raise SpecError(f"profile: {where}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")
    engine = data.get("engine")
    if engine not in ENGINES:
        raise SpecError(f"profile: {where}: engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    scale = data.get("scale", {})
    if not isinstance(scale, dict):
        raise SpecError(f"profile: {where}: scale must be an object term -> factor, got {scale!r}")
    for term, v in scale.items():
        if term not in TERMS:
            raise SpecError(f"profile: {where}: scale has unknown term {term!r} (known: {', '.join(TERMS)})")
        _number(v, f"scale[{term!r}]", where, positive=True)
    fixed = data.get("fixed", {})
    if not isinstance(fixed, dict):
        raise SpecError(f"profile: {where}: fixed must be an object, got {fixed!r}")
    for k in fixed:
        if k not in FIXED:
            raise SpecError(f"profile: {where}: fixed has unknown key {k!r} (known: {', '.join(FIXED)})")
    per = {k: _number(fixed.get(k, 0.0), f"fixed[{k!r}]", where, positive=False) for k in FIXED}
    source = data.get("source", "")
    if not isinstance(source, str):
        raise SpecError(f"profile: {where}: source must be a string, got {source!r}")
    unc, fitted = data.get("uncertainty"), data.get("fitted_from")
    if unc is not None and not isinstance(unc, dict):
        raise SpecError(f"profile: {where}: uncertainty must be an object, got {unc!r}")
    if fitted is not None and not isinstance(fitted, list):
        raise SpecError(f"profile: {where}: fitted_from must be a list, got {fitted!r}")
    return Profile(engine=engine, scale={k: float(v) for k, v in scale.items()},
                   per_step_s=per["per_step_s"], per_layer_s=per["per_layer_s"], uncertainty=unc,
                   fitted_from=fitted, source=source, path="" if isinstance(src, dict) else str(src))
