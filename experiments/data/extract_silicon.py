"""Extract the silicon-sample rows of moelab's preset models on preset GPUs from aiconfigurator-core.

    python experiments/data/extract_silicon.py --wheel aiconfigurator_core-0.12.0-...whl
    python experiments/data/extract_silicon.py --download          # pip download the pinned wheel
    python experiments/data/extract_silicon.py --wheel W --aic     # also aiconfigurator's estimate

The wheel (NVIDIA, Apache-2.0) ships `aiconfigurator_core/systems/silicon_sample.csv`: measured
TTFT/TPOT of vLLM, SGLang and TensorRT-LLM deployments. This script keeps the aggregated-serving
rows (`mode == agg`) of the models in MODELS on the GPUs in SYSTEMS, drops the long provenance
string (keeping its concurrency and data-source tag), and writes `silicon_rows.csv` with a
sidecar `silicon_rows.json`: package, version, license, file and its sha256, the filter and the
counts it left. `--aic` runs the package's own static estimator on every kept row (it needs the
package importable, with pyyaml) and adds its TTFT/TPOT as `aic_ttft_ms`, `aic_tpot_ms`.

pandas is used here only; moelab reads the small CSV with the csv module.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "aiconfigurator-core", "0.12.0"
MEMBER = "aiconfigurator_core/systems/silicon_sample.csv"
HERE = Path(__file__).resolve().parent
OUT_CSV, OUT_JSON = HERE / "silicon_rows.csv", HERE / "silicon_rows.json"

# The checkpoints of moelab's model presets (the FP8 Qwen3 checkpoint is the same architecture;
# its dtype is the row's moe_quant_mode). Kimi-K2.5 is not the kimi-k2 preset: left out.
MODELS = {
    "deepseek-ai/DeepSeek-R1": "deepseek-r1",
    "deepseek-ai/DeepSeek-V3": "deepseek-v3",
    "openai/gpt-oss-120b": "gpt-oss-120b",
    "Qwen/Qwen3-235B-A22B-FP8": "qwen3-235b-a22b",
}
SYSTEMS = {"h100_sxm": "h100-sxm", "h200_sxm": "h200-sxm", "b200_sxm": "b200", "gb200": "gb200"}
COLUMNS = ["id", "backend", "backend_version", "model_path", "model", "system_aic", "system",
           "precision", "gemm_quant_mode", "moe_quant_mode", "isl", "osl", "batch_size", "concurrency",
           "tp_size", "pp_size", "attention_dp_size", "moe_tp_size", "moe_ep_size", "source_tag",
           "silicon_ttft_ms", "silicon_tpot_ms"]
INT_COLUMNS = ["isl", "osl", "batch_size", "concurrency", "tp_size", "pp_size", "attention_dp_size",
               "moe_tp_size", "moe_ep_size"]


def extract(csv_bytes: bytes):
    """(kept rows as a DataFrame with COLUMNS, counts) from the silicon sample's CSV bytes."""
    import pandas as pd

    df = pd.read_csv(io.BytesIO(csv_bytes))
    counts = {"rows_in_file": len(df)}
    ours = df[df["model_path"].isin(MODELS) & df["system"].isin(SYSTEMS)]
    counts["preset_model_and_gpu"] = len(ours)
    counts["by_mode"] = {str(k): int(v) for k, v in ours["mode"].value_counts().sort_index().items()}
    agg = ours[ours["mode"] == "agg"].copy()
    src = agg["silicon_data_source"].fillna("")
    agg["concurrency"] = pd.to_numeric(src.str.extract(r"silicon_concurrency=(\d+)")[0], errors="coerce")
    agg["source_tag"] = src.str.split(";").str[0].str.strip()
    agg["model"] = agg["model_path"].map(MODELS)
    agg["system_aic"] = agg["system"]
    agg["system"] = agg["system_aic"].map(SYSTEMS)
    for c in INT_COLUMNS:
        agg[c] = pd.to_numeric(agg[c], errors="coerce").astype("Int64")
    agg = agg[COLUMNS].sort_values("id", kind="stable").reset_index(drop=True)
    counts["kept_agg"] = len(agg)
    for col in ("backend", "system", "model"):
        counts[f"kept_by_{col}"] = {str(k): int(v) for k, v in agg[col].value_counts().sort_index().items()}
    return agg, counts


def read_wheel(path: Path) -> tuple[bytes, dict]:
    """The silicon sample's bytes and the wheel's metadata (name, version, license, RECORD hash)."""
    if path.is_dir():
        read = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
        names, get = list(read), (lambda n: read[n].read_bytes())
    else:
        z = zipfile.ZipFile(path)
        names, get = z.namelist(), z.read
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = get(meta_name).decode()
    field = {k: v.strip() for k, _, v in (line.partition(":") for line in meta.splitlines()[:40]) if v}
    record = get(meta_name.replace("METADATA", "RECORD")).decode()
    recorded = next((line.split(",")[1] for line in record.splitlines() if line.startswith(MEMBER + ",")), "")
    data = get(MEMBER)
    return data, {"package": field.get("Name"), "version": field.get("Version"),
                  "license": field.get("License-Expression") or field.get("License"),
                  "license_source": f"{meta_name} (License-Expression)",
                  "author": field.get("Author-email"), "file": MEMBER, "record_hash": recorded,
                  "sha256": hashlib.sha256(data).hexdigest(), "wheel": path.name}


def download() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="aic-wheel-"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-d", str(folder), f"{PACKAGE}=={VERSION}"], check=True)
    return next(folder.glob("*.whl"))


def aic_estimates(rows, package_root: Path) -> tuple[list, list]:
    """aiconfigurator's static estimate (TTFT ms, TPOT ms, its data version) per row, or the reason it
    has none. The package resolves perf data through version aliases, not the rows' raw versions:
    'current' is its newest data for that backend and GPU (the version is recorded per row)."""
    sys.path.insert(0, str(package_root))
    from aiconfigurator_core.sdk import common, config
    from aiconfigurator_core.sdk.backends.factory import get_backend
    from aiconfigurator_core.sdk.models import get_model
    from aiconfigurator_core.sdk.perf_database import get_database

    dbs, out, why = {}, [], []
    for r in rows.itertuples():
        key = (r.system_aic, r.backend, "current")
        try:
            if key not in dbs:
                dbs[key] = get_database(*key)
            if dbs[key] is None:
                raise LookupError(f"no perf data for {key}")
            mc = config.ModelConfig(
                tp_size=int(r.tp_size), pp_size=int(r.pp_size), attention_dp_size=int(r.attention_dp_size),
                moe_tp_size=int(r.moe_tp_size), moe_ep_size=int(r.moe_ep_size),
                gemm_quant_mode=common.GEMMQuantMode[r.gemm_quant_mode],
                moe_quant_mode=common.MoEQuantMode[r.moe_quant_mode],
                kvcache_quant_mode=common.KVCacheQuantMode.bfloat16,
                fmha_quant_mode=common.FMHAQuantMode.bfloat16)
            model = get_model(r.model_path, mc, r.backend)
            rc = config.RuntimeConfig(batch_size=int(r.batch_size), isl=int(r.isl), osl=int(r.osl))
            s = get_backend(r.backend).run_static(model, dbs[key], rc, "static").get_summary_df()
            out.append((float(s["ttft"].iloc[0]), float(s["tpot"].iloc[0]), str(s["version"].iloc[0])))
            why.append("")
        except Exception as e:  # any failure of the foreign estimator: recorded per row, not fatal
            out.append((None, None, None))
            why.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    return out, why


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", type=Path, help="the aiconfigurator-core wheel (.whl) or its unpacked folder")
    src.add_argument("--download", action="store_true", help=f"pip download {PACKAGE}=={VERSION}")
    ap.add_argument("--out", type=Path, default=OUT_CSV, help="CSV to write (the JSON goes beside it)")
    ap.add_argument("--aic", action="store_true", help="add aiconfigurator's own static estimate per row")
    ap.add_argument("--aic-root", type=Path, help="folder holding the unpacked aiconfigurator_core package")
    a = ap.parse_args(argv)
    wheel = download() if a.download else a.wheel
    if not wheel.exists():
        print(f"extract_silicon: no such wheel {str(wheel)!r}", file=sys.stderr)
        return 2
    data, meta = read_wheel(wheel)
    if (meta["package"], meta["version"]) != (PACKAGE, VERSION):
        print(f"extract_silicon: {wheel} is {meta['package']} {meta['version']}, pinned {PACKAGE} {VERSION}",
              file=sys.stderr)
        return 2
    rows, counts = extract(data)
    if a.aic:
        root = a.aic_root or (wheel if wheel.is_dir() else None)
        if root is None:
            print("extract_silicon: --aic needs --aic-root (the unpacked package) or --wheel FOLDER",
                  file=sys.stderr)
            return 2
        est, why = aic_estimates(rows, root)
        rows["aic_ttft_ms"] = [e[0] for e in est]
        rows["aic_tpot_ms"] = [e[1] for e in est]
        rows["aic_data_version"] = [e[2] for e in est]
        rows["aic_error"] = why
        counts["aic_estimated"] = int(sum(e[0] is not None for e in est))
        meta["aic_estimator"] = ("aiconfigurator_core.sdk backend.run_static(model, get_database(system, "
                                 "backend, 'current'), RuntimeConfig(batch_size, isl, osl), 'static'); "
                                 "KV cache and FMHA bfloat16 (the rows do not record them)")
    provenance = {**meta, "filter": {"mode": "agg", "model_path": sorted(MODELS), "system": sorted(SYSTEMS)},
                  "model_map": MODELS, "system_map": SYSTEMS, "counts": counts,
                  "command": f"python experiments/data/extract_silicon.py --wheel {wheel.name}"
                             + (" --aic" if a.aic else "")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_csv, tmp_json = a.out.with_suffix(".csv.tmp"), a.out.with_suffix(".json.tmp")
    rows.to_csv(tmp_csv, index=False, float_format="%.6g")
    tmp_json.write_text(json.dumps(provenance, indent=1) + "\n")
    tmp_csv.replace(a.out)
    tmp_json.replace(a.out.with_suffix(".json"))
    print(f"{counts['kept_agg']} rows of {counts['rows_in_file']} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
