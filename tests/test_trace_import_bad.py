"""`moelab trace import` of a .pt file that is no torch.save dump: one line and exit 2, whatever
the bytes, and nothing in the file is run."""

import pytest

from moelab.cli import main


@pytest.mark.parametrize("content", [
    b"hello\n",  # text: the weights-only unpickler reads 'h' as a memo lookup (KeyError before)
    b"",
    b"\x80\x02K\x01.",  # a pickle of the int 1: no dict
    b"cos\nsystem\n(S'touch RAN'\ntR.",  # a protocol-0 pickle calling os.system
])
def test_a_pt_file_that_is_no_dump_is_one_line(tmp_path, capsys, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.pt").write_bytes(content)
    assert main(["trace", "import", "d.pt", "--out", "t.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "'d.pt'" in err
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "RAN").exists()
