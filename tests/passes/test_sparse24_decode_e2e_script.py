"""The 2:4 end-to-end decode script runs on a tiny shape on the CPU (reference path), so a GPU session can run it as is."""

import sys

import sparse24_decode_e2e


def test_sparse24_decode_e2e_tiny_on_cpu(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sparse24_decode_e2e.py", "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                                      "--repeats", "1", "--prompt-tokens", "8", "--new-tokens", "4"])
    sparse24_decode_e2e.main()
    out = capsys.readouterr().out
    assert "14 projections 2:4" in out  # 2 layers x 7
    rows = [l for l in out.splitlines() if l.startswith("| dense") or l.startswith("| 2:4")]
    assert len(rows) == 2 and rows[0].endswith("1.00x |")
