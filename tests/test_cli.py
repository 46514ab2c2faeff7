"""The command line as a user meets it: JSON, tables, and one clear line for bad input."""

import json
import os
import subprocess
import sys

import pytest

from moelab.cli import keep_compiled_programs, main
from moelab.costmodel.presets import load_system, system_names

SEED = ["--model", "deepseek-r1", "--b-pcie", "64", "--b-net", "50", "--expert-dtype", "fp8",
        "--act-dtype", "bf16"]


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_seed_example_json(capsys):
    out = run_json(capsys, "gamma", *SEED, "--tokens", "4096")
    assert out["gamma"] == pytest.approx(75)
    assert out["tipping_tokens"] == 307200
    assert out["decision"] == "ep"
    for key in ("n_ue", "t_p_overhead_s", "t_ep_overhead_s", "fanout", "f_e", "f_a",
                "b_pcie", "b_net"):
        assert key in out
    assert out["b_pcie"] == 64e9 and out["b_net"] == 50e9 and out["f_e"] == 1 and out["f_a"] == 2


def test_seed_decode_batch_one(capsys):
    out = run_json(capsys, "gamma", *SEED, "--decode", "--batch", "1", "--steps", "100")
    assert out["gamma"] == pytest.approx(9600)
    assert out["tipping_tokens"] is None


def test_offload_wins_past_the_tipping_point(capsys):
    out = run_json(capsys, "gamma", *SEED, "--tokens", "400000")
    assert out["decision"] == "offload" and out["gamma"] < 1


def test_extensions_flags(capsys):
    out = run_json(capsys, "gamma", *SEED, "--tokens", "4096", "--ep-ranks", "32",
                   "--dispatch-dtype", "fp8", "--alpha-net-us", "20", "--resident-fraction", "0.5")
    assert out["fanout"] == pytest.approx(7.04, abs=0.01)
    assert out["f_dispatch"] == 1 + 4 / 128 and out["f_combine"] == 2  # fp8 + a scale per 128
    assert out["alpha_net_s"] == pytest.approx(20e-6)
    assert out["gamma"] < 75  # fan-out and residency both favour offload here


def test_uniform_routing(capsys):
    out = run_json(capsys, "gamma", *SEED, "--tokens", "16", "--routing", "uniform")
    assert out["n_ue"] == pytest.approx(101.96, abs=0.01)


def test_table_names_the_three_factors(capsys):
    assert main(["gamma", *SEED, "--tokens", "4096"]) == 0
    text = capsys.readouterr().out
    for word in ("model", "system", "query", "307,200", "75", "gamma measured"):
        assert word in text
    assert "decides" not in text  # the three factors scale gamma alike: none decides alone


def test_tipping_and_presets(capsys):
    out = run_json(capsys, "tipping", *SEED)
    assert out["tipping_tokens"] == pytest.approx(307200)
    rows = run_json(capsys, "presets")
    assert {"deepseek-r1", "mixtral-8x7b", "qwen3-235b-a22b"} <= {m["name"] for m in rows["models"]}
    assert {"h100-sxm", "h200-sxm", "b200", "gb200", "gh200"} <= {s["name"] for s in rows["systems"]}
    table = run_json(capsys, "tipping", "--all-models")
    assert len(table) == len(rows["models"])


@pytest.mark.parametrize("name", system_names())
def test_every_system_preset(name):
    s = load_system(name)
    assert s.b_pcie > 0 and s.b_net > 0 and s.source
    assert load_system(name, measured=True).b_pcie > 0


def test_system_file(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"b_pcie": 32e9, "b_net": 50e9, "source": "test"}))
    out = run_json(capsys, "gamma", "--system", str(path), "--tokens", "4096",
                   "--expert-dtype", "fp8")
    assert out["b_pcie"] == 32e9 and out["gamma"] == pytest.approx(150)


BAD = [
    (["gamma", "--tokens", "-5"], "--tokens: must be >= 1, got -5"),  # 0 is refused too
    (["gamma", "--tokens", "0"], "--tokens: must be >= 1, got 0"),
    (["gamma", "--decode", "--batch", "0"], "--batch: must be > 0"),
    (["gamma", "--b-pcie", "0"], "--b-pcie"),
    (["gamma", "--b-net", "-1"], "--b-net"),
    (["gamma", "--b-net", "nan"], "--b-net"),
    (["gamma", "--alpha-net-us", "-3"], "--alpha-net-us"),
    (["gamma", "--resident-fraction", "2"], "--resident-fraction: must be <= 1"),
    (["gamma", "--model", "no-such-model"], "unknown preset"),
    (["gamma", "--system", "no-such-gpu"], "unknown preset"),
    (["gamma", "--expert-dtype", "int3"], "--expert-dtype"),
    (["gamma", "--tokens", "lots"], "moelab gamma: error: argument --tokens"),
    (["gamma", "--fanout", "2", "--ep-ranks", "4"], "--ep-ranks"),
    (["gamma", "--routing", "zipf:1.1"], "--routing: zipf:1.1 is drawn by Monte Carlo: add samples"),
    (["gamma", "--routing", "banana"], "--routing: unknown routing 'banana'"),  # not "needs samples"
    (["gamma", "--routing", "banana", "--samples", "3"], "--routing: unknown routing 'banana'"),
    (["gamma", "--tokens", "5", "--decode"], "--tokens"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv, field", BAD)
def test_bad_input_exit_2_one_line(argv, field, capsys):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert field in err[0]


@pytest.mark.parametrize(
    "content, field",
    [
        ('{"num_local_experts": 8,', "not valid JSON"),  # malformed
        ('{"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2, '
         '"intermediate_size": 16}', "not a mixture of experts"),  # dense
        ('{"num_local_experts": 4, "num_experts_per_tok": 6, "hidden_size": 8, '
         '"num_hidden_layers": 2, "intermediate_size": 16}', "top_k"),  # k > E
    ],
)
def test_bad_config_files(tmp_path, capsys, content, field):
    path = tmp_path / "config.json"
    path.write_text(content)
    assert main(["gamma", "--model", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]


def test_subprocess_no_traceback_and_light_imports():
    # A real process: exit code 2, one line, no traceback ...
    bad = subprocess.run([sys.executable, "-m", "moelab", "gamma", "--b-pcie", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    # ... and `moelab gamma` imports none of jax, triton or torch.
    probe = ("import sys; from moelab.cli import main; main(['gamma', '--json']); "
             "heavy = [m for m in ('jax', 'triton', 'torch') if m in sys.modules]; "
             "sys.stderr.write(repr(heavy))")
    ok = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stderr.strip() == "[]"


def test_overlap_reports_step_times_and_exposed_overheads(capsys):
    out = run_json(capsys, "gamma", *SEED, "--tokens", "4096", "--overlap")
    assert out["gamma"] == pytest.approx(75)
    for key in ("speedup_ep_overlap", "t_p_overlap_s", "t_ep_overlap_s", "t_p_exposed_s",
                "t_ep_exposed_s", "offload_transfer_hidden", "ep_transfer_hidden"):
        assert key in out
    assert "gamma_overlap" not in out
    # Overlap can only hide time: neither exposed overhead exceeds the seed's.
    assert out["t_p_exposed_s"] <= out["t_p_overhead_s"] * (1 + 1e-9)
    assert out["t_ep_exposed_s"] <= out["t_ep_overhead_s"] * (1 + 1e-9)
    assert out["speedup_ep_overlap"] == pytest.approx(out["t_p_overlap_s"] / out["t_ep_overlap_s"])
    assert main(["gamma", *SEED, "--tokens", "4096", "--overlap", "--b-net", "5000"]) == 0
    assert "fully hidden" in capsys.readouterr().out


def test_kimi_ep16_reports_both_tiers_the_imbalance_and_the_deciding_leg(capsys):
    out = run_json(capsys, "gamma", "--model", "kimi-k2", "--tokens", "4096", "--ep-ranks", "16")
    for key in ("fanout", "fanout_intra", "fanout_nodes", "fanout_ranks_inter", "t_ep_net_s",
                "t_ep_nvlink_s", "imbalance", "ep_deciding_leg", "gamma_measured"):
        assert key in out, key
    # 384 experts, 24 per rank, 192 per node: a token misses the other node with
    # probability C(192, 8) / C(384, 8) (by hand: prod_{i<8} (192 - i) / (384 - i)).
    import math

    miss = math.prod((192 - i) / (384 - i) for i in range(8))
    assert out["fanout_nodes"] == pytest.approx(1 - miss, rel=1e-12)
    assert out["fanout_intra"] + out["fanout_ranks_inter"] == pytest.approx(out["fanout"])
    assert out["ep_deciding_leg"] == "network" and out["dispatch_mode"] == "per-node"
    assert 1 < out["imbalance"] < 1.05
    # per-node dispatch: one network copy per remote node, so gamma is near the seed's 112.5
    assert out["gamma"] == pytest.approx(112.5 / (out["fanout_nodes"] * out["imbalance"]), rel=1e-9)
    per_rank = run_json(capsys, "gamma", "--model", "kimi-k2", "--tokens", "4096", "--ep-ranks",
                        "16", "--dispatch-mode", "per-rank")
    assert per_rank["net_copies"] == pytest.approx(out["fanout_ranks_inter"])
    assert per_rank["gamma"] < out["gamma"] / 3


def test_ep_flags_errors(capsys):
    for argv, flag in ((["--ep-ranks", "16", "--gpus-per-node", "0"], "--gpus-per-node"),
                       (["--ep-ranks", "16", "--redundant-experts", "-1"], "--redundant-experts"),
                       (["--redundant-experts", "4"], "--redundant-experts")):
        assert main(["gamma", *argv]) == 2
        assert flag in capsys.readouterr().err


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["sweep", "--tokens", "1:10:log:3", "--out", str(blocker / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the path the user typed, not the temporary file beside it
    assert len(err) == 1 and str(blocker / "x.csv") in err[0] and ".tmp" not in err[0]


def test_unwritable_folder_names_the_users_path(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if (locked / "probe").touch() is None:  # root ignores the mode: nothing to test
            (locked / "probe").unlink()
            pytest.skip("running as root: a read-only folder is still writable")
    except PermissionError:
        pass
    try:
        assert main(["sweep", "--tokens", "1,2", "--out", str(locked / "s.csv")]) == 2
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(locked / "s.csv") in err[0] and ".tmp" not in err[0]
    assert list(locked.iterdir()) == []


def test_output_in_a_missing_folder_is_refused_not_created(tmp_path, capsys):
    target = tmp_path / "no" / "such" / "dir" / "s.csv"
    assert main(["sweep", "--tokens", "1,2", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0] and "does not exist" in err[0]
    assert not (tmp_path / "no").exists()


def test_one_ep_rank_means_nothing_is_remote(capsys):
    # phi = 0: EP moves nothing, so gamma is infinite (null in strict JSON) and EP wins.
    out = run_json(capsys, "gamma", *SEED, "--ep-ranks", "1")
    assert out["fanout"] == 0 and out["gamma"] is None and out["decision"] == "ep"
    assert main(["gamma", *SEED, "--ep-ranks", "1"]) == 0
    assert "EP wins at every N_t" in capsys.readouterr().out


def test_config_json_in_the_working_folder_gets_a_name(tmp_path, monkeypatch, capsys):
    """No `_name_or_path`: the folder names the model; with one, it does."""
    import shutil

    from moelab.costmodel.presets import PRESETS

    folder = tmp_path / "my-moe"
    folder.mkdir()
    cfg = json.loads((PRESETS / "models" / "mixtral-8x7b.json").read_text())
    cfg.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(folder)
    assert run_json(capsys, "gamma", "--model", "config.json")["model"]["name"] == "my-moe"
    assert main(["tipping", "--model", "config.json"]) == 0
    assert "my-moe" in capsys.readouterr().out
    (folder / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "org/Some-MoE"}))
    assert run_json(capsys, "gamma", "--model", "config.json")["model"]["name"] == "org/Some-MoE"
    shutil.rmtree(folder / "__pycache__", ignore_errors=True)


def test_swapped_links_are_in_the_title(capsys):
    assert main(["gamma", "--system", "b200", "--host-link", "pcie-gen4-x16",
                 "--network", "roce-100g"]) == 0
    title = capsys.readouterr().out.splitlines()[0]
    assert "on b200 (host link pcie-gen4-x16, network roce-100g)" in title


def test_sensitivities_one_row_each_no_negative_zero(capsys):
    assert main(["gamma", *SEED, "--sensitivities"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if "d ln γ / d ln" in line]
    # every elasticity on its own row; R1 at 4096 tokens is past saturation (k N_t > E), so
    # gamma = C E / N_t: d ln gamma / d ln tokens = -1 exactly
    assert len(rows) >= 10
    assert any(line.split("│")[1].strip() == "d ln γ / d ln tokens" and line.split("│")[3].strip() == "-1"
               for line in rows)
    assert not any(cell.strip() == "-0" for line in rows for cell in line.split("│"))


def test_monte_carlo_table_labels_its_interval_and_verdict(capsys):
    assert main(["gamma", *SEED, "--tokens", "16", "--routing", "zipf:1.2", "--samples", "4"]) == 0
    text = capsys.readouterr().out
    assert "p05 – p95" in text
    last = text.strip().splitlines()[-1]
    assert "mean over 4 zipf:1.2 routings" in last


def test_table_says_how_shared_experts_are_treated(capsys):
    assert main(["gamma", *SEED]) == 0  # DeepSeek-R1: one shared expert per MoE layer
    assert "Shared experts (1 per MoE layer): resident" in capsys.readouterr().out
    assert run_json(capsys, "gamma", *SEED)["model"]["n_shared_experts"] == 1


def test_ep_and_gamma_default_to_the_same_model():
    from moelab.cli import build_parser

    defaults = {}
    for command in ("gamma", "ep"):
        parser = build_parser(command)
        args = parser.parse_args([command])
        defaults[command] = args.model
    assert defaults["gamma"] == defaults["ep"] == "deepseek-r1"


def test_cli_keeps_compiled_programs_in_a_cache_folder_only_when_unset(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    keep_compiled_programs()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "moelab" / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # the user's choice: none
    keep_compiled_programs()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == ""
