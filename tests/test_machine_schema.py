"""One schema for a machine (issue 20, section 2): a --system or --cpu file holds one entry
of systems.json's "gpus" or cpus.json's "cpus", checked by the same code as the presets."""

import json

import pytest

from moelab.cli import main
from moelab.costmodel.presets import cpu_names, cpu_table, load_cpu, load_system, system_names
from moelab.costmodel.specs import as_dict


def show(capsys, name: str) -> dict:
    assert main(["presets", "--show", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", system_names())
def test_every_gpu_preset_copies_into_a_file_that_loads_the_same(name, tmp_path, capsys):
    entry = show(capsys, name)
    assert entry["name"] == name
    path = tmp_path / "my.json"
    path.write_text(json.dumps(entry))
    for kw in ({}, {"measured": True, "latencies": True}):
        assert as_dict(load_system(str(path), **kw)) == as_dict(load_system(name, **kw))


@pytest.mark.parametrize("name", cpu_names())
def test_every_cpu_preset_copies_into_a_file_that_loads_the_same(name, tmp_path, capsys):
    entry = show(capsys, name)
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(entry))
    for isa in cpu_table()["cpus"][name]["ops_per_core_cycle"]:
        assert load_cpu(str(path), isa) == load_cpu(name, isa)


def test_an_edited_copy_is_what_plan_and_gamma_use(tmp_path, capsys):
    """The issue's workflow: show, edit, use. hbm_TBps and the host link changed by hand."""
    entry = show(capsys, "h100-sxm")
    entry.update(name="mine", hbm_TBps=2.0, host_link="pcie-gen4-x16")
    path = tmp_path / "my.json"
    path.write_text(json.dumps(entry))
    s = load_system(str(path))
    assert (s.name, s.hbm_bw, s.b_pcie) == ("mine", 2.0e12, 32e9)  # systems.json: Gen4 x16 32 GB/s
    assert main(["plan", "--model", "qwen3-30b-a3b", "--system", str(path), "--gpus", "1",
                 "--decode-batch", "1", "--nominal", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["system"]["name"] == "mine" and out["system"]["b_pcie"] == 32e9


def test_fields_the_new_presets_bring(tmp_path, capsys):
    """fp8 null (no fp8 tensor path: the bf16 rate), an fp4 rate, scale_up naming a network
    entry or null (no scale-up: the host link), an inline host link with a measurement."""
    entry = show(capsys, "h100-sxm")
    entry.update(fp8_dense_TFLOPs=None, fp4_dense_TFLOPs=None, scale_up=None,
                 host_link={"bandwidth_GBps": 32, "measured_GBps": 25, "latency_us": 10, "source": "me"})
    path = tmp_path / "g.json"
    path.write_text(json.dumps(entry))
    s = load_system(str(path))
    assert s.peak_flops_fp8 == s.peak_flops == 989e12
    assert s.b_pcie == s.b_nvlink == 32e9 and s.alpha_pcie == 0
    m = load_system(str(path), measured=True, latencies=True)
    assert m.b_pcie == 25e9 and m.alpha_pcie == pytest.approx(10e-6)
    entry.update(scale_up="ib-ndr-400", fp4_dense_TFLOPs=4000)
    path.write_text(json.dumps(entry))
    assert load_system(str(path)).b_nvlink == 50e9  # systems.json: ib-ndr-400 is 50 GB/s


def test_avx2_is_a_cpu_isa(tmp_path, capsys):
    entry = show(capsys, "xeon-8470")
    entry["ops_per_core_cycle"] = {"avx2": {"bf16": 32, "int8": 64}}  # made-up rates for the test
    path = tmp_path / "c.json"
    path.write_text(json.dumps(entry))
    assert main(["plan", "--model", "qwen3-30b-a3b", "--cpu", str(path), "--cpu-isa", "avx2",
                 "--gpus", "1", "--decode-batch", "1", "--json"]) == 0
    host = json.loads(capsys.readouterr().out)["host"]
    assert host["cpu_isa"] == "avx2"
    assert host["cpu_matrix_rate"] == pytest.approx(2 * 52 * 2.0e9 * 64)  # sockets x cores x GHz x ops


def test_old_si_system_files_still_read(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"b_pcie": 32e9, "b_net": 50e9, "alpha_pcie": 1e-5, "source": "old"}))
    s = load_system(str(path))
    assert (s.name, s.b_pcie, s.alpha_pcie) == ("old", 32e9, 1e-5)


H100 = {"name": "x", "hbm_GB": 80, "hbm_TBps": 3.35, "bf16_dense_TFLOPs": 989, "fp8_dense_TFLOPs": 1979,
        "gpus_per_node": 8, "host_link": "pcie-gen5-x16", "network": "ib-ndr-400", "scale_up": "nvlink4",
        "source": "test"}
XEON = {"name": "y", "sockets": 2, "cores": 52, "base_GHz": 2.0, "dram_channels": 8, "dram_MTps": 4800,
        "dram_measured_GBps": None, "ops_per_core_cycle": {"avx512": {"bf16": 128, "int8": 256}},
        "source": "test"}
BAD = [
    ("--system", {**H100, "hbm_TBps": "fast"}, "'hbm_TBps' must be a number > 0"),
    ("--system", {**H100, "hbm_tbps": 3}, "unknown field(s) hbm_tbps"),
    ("--system", {k: v for k, v in H100.items() if k != "hbm_GB"}, "missing field 'hbm_GB'"),
    ("--system", {**H100, "gpus_per_node": 2.5}, "'gpus_per_node' must be an integer >= 1"),
    ("--system", {**H100, "network": "carrier-pigeon"}, "'network' names no networks preset"),
    ("--system", {**H100, "host_link": {"bandwidth_GBps": 32}}, "missing field 'host_link.source'"),
    ("--system", {**H100, "host_link": {"bandwidth_GBps": "x", "source": "s"}},
     "'host_link.bandwidth_GBps' must be a number > 0 or null"),
    ("--system", {"b_pcie": 1e9, "b_net": 1e9, "hbm_GB": 80}, "unknown field(s) hbm_GB"),  # old + new
    ("--system", [H100], "must hold a JSON object"),
    ("--cpu", {**XEON, "cores": "two"}, "'cores' must be an integer >= 1"),
    ("--cpu", {**XEON, "threads": 4}, "unknown field(s) threads"),
    ("--cpu", {k: v for k, v in XEON.items() if k != "sockets"}, "missing field 'sockets'"),
    ("--cpu", {**XEON, "ops_per_core_cycle": {"mmx": {"bf16": 1}}}, "unknown instruction set 'mmx'"),
    ("--cpu", {**XEON, "ops_per_core_cycle": {}}, "no bf16 matrix rate"),
    ("--cpu", {**XEON, "dram_channels": None, "dram_MTps": None}, "no DRAM bandwidth"),
    ("--cpu", {**XEON, "matmul_measured_TOPS": {"fp64": 1}}, "unknown dtype 'fp64'"),
    ("--cpu", H100, "unknown field(s)"),  # a GPU file given as the CPU
]


@pytest.mark.parametrize("flag,data,message", BAD)
def test_a_bad_file_is_one_line_naming_the_field_and_the_file(flag, data, message, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["plan", "--model", "qwen3-30b-a3b", flag, str(path), "--gpus", "1",
                 "--decode-batch", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err


def test_the_good_base_files_load(tmp_path):
    """The BAD cases differ from these in one field each: these load."""
    for name, data, load in (("g.json", H100, load_system), ("c.json", XEON, load_cpu)):
        (tmp_path / name).write_text(json.dumps(data))
        load(str(tmp_path / name))


def test_show_unknown_name_is_one_line(capsys):
    assert main(["presets", "--show", "rtx-9999"]) == 2
    assert "--show: no GPU or CPU preset 'rtx-9999'" in capsys.readouterr().err


def test_every_link_preset_passes_the_link_schema():
    """Host links and networks go through the same check as an inline link object."""
    from moelab.costmodel.presets import system_table

    for name, e in system_table()["host_links"].items():
        assert load_system("h100-sxm", host_link=name).b_pcie == e["bandwidth_GBps"] * 1e9
    for name, e in system_table()["networks"].items():
        assert load_system("h100-sxm", network=name).b_net == e["bandwidth_GBps"] * 1e9
