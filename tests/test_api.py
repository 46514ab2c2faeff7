"""The Python API: the same answers as the CLI, specs or names in, SI units out."""

import json
import subprocess
import sys

import pytest

import moelab
from moelab.cli import main


def test_seed_gamma_from_names():
    r = moelab.gamma("deepseek-r1", tokens=4096, b_pcie=64e9, b_net=50e9, expert_dtype="fp8",
                     act_dtype="bf16")
    # by hand: 1/2 * (3 * 2048 * 1 B) / (2 B) * 50/64 * min(8 * 4096, 256) / 4096
    assert r.gamma == pytest.approx(0.5 * 3 * 2048 / 2 * 50 / 64 * 256 / 4096)
    assert r["gamma"] == r.gamma and r.decision == "ep" and r.tipping_tokens == 307200
    with pytest.raises(AttributeError):
        _ = r.no_such_key


def test_specs_in_give_what_names_give():
    model = moelab.load_model("deepseek-r1").with_(expert_dtype="fp8")
    system = moelab.load_system("h100-sxm").with_(b_pcie=64e9, b_net=50e9)
    by_spec = moelab.gamma(model, system, tokens=4096)
    by_name = moelab.gamma("deepseek-r1", "h100-sxm", tokens=4096, b_pcie=64e9, b_net=50e9,
                           expert_dtype="fp8")
    assert by_spec.gamma == by_name.gamma
    with pytest.raises(moelab.SpecError, match="host_link"):
        moelab.gamma(model, system, host_link="pcie-gen4-x16")


def test_api_and_cli_json_agree(capsys):
    argv = ["gamma", "--model", "mixtral-8x7b", "--tokens", "512", "--ep-ranks", "8",
            "--routing", "uniform", "--b-pcie", "32", "--alpha-net-us", "10", "--json"]
    assert main(argv) == 0
    from_cli = json.loads(capsys.readouterr().out)
    from_api = json.loads(moelab.gamma("mixtral-8x7b", tokens=512, ep_ranks=8, routing="uniform",
                                       b_pcie=32e9, alpha_net=10e-6).to_json())
    assert from_cli == from_api


def test_decode_and_bad_input():
    assert moelab.gamma(expert_dtype="fp8", act_dtype="bf16", b_pcie=64e9, b_net=50e9,
                        decode=True, batch=1).gamma == pytest.approx(9600)
    with pytest.raises(moelab.SpecError, match="tokens"):
        moelab.gamma(tokens=0)
    with pytest.raises(moelab.SpecError, match="samples"):
        moelab.gamma(routing="zipf:1.2")
    with pytest.raises(moelab.SpecError, match="b_pcie"):
        moelab.gamma(b_pcie=0)


def test_infinite_gamma_is_null_in_json():
    r = moelab.gamma(ep_ranks=1)  # one rank: nothing is remote, EP costs nothing
    assert r.gamma == float("inf") and json.loads(r.to_json())["gamma"] is None


def test_import_is_light_and_names_load_lazily():
    probe = ("import sys, moelab; heavy = [m for m in ('numpy', 'jax', 'torch') if m in sys.modules];"
             " assert not heavy, heavy; moelab.gamma(); assert 'numpy' in sys.modules;"
             " assert 'jax' not in sys.modules; print(sorted(moelab.__all__))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "gamma" in done.stdout and "load_model" in done.stdout
    with pytest.raises(AttributeError):
        _ = moelab.no_such_name
