"""The GPU FLAP speed script runs end to end on a tiny shape on the CPU, so it works when a GPU session runs it."""

import sys

import flap_gpu_speed


def test_flap_gpu_speed_tiny_on_cpu(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["flap_gpu_speed.py", "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--seq-len", "32"])
    flap_gpu_speed.main()
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| prefill") or l.startswith("| decode")]
    assert len(rows) == 6
    params = {l.split("|")[2].strip(): int(l.split("|")[3].replace(",", "")) for l in rows}
    assert params["flap-50"] < params["flap-20"] < params["dense"]


def test_synthetic_stats_plan_hits_the_target():
    import torch

    from slimc.passes.flap import FlapConfig, plan_flap

    dense = flap_gpu_speed.random_llama("tiny", torch.float32)
    fp = plan_flap(dense, torch.zeros(1, 2, dtype=torch.long), FlapConfig(sparsity=0.5), flap_gpu_speed.synthetic_stats(dense))
    assert abs(fp.stats["sparsity"] - 0.5) < 0.05
