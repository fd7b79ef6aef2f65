"""Report: counts, sizes, pass stats, verification and per-layer widths (with the PNG plot)."""

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimc.compiler.emit.report import build_report, jsonable, layer_widths, path_bytes, render_markdown, write_report
from slimc.compiler.model import Model, PassRecord


def tiny() -> Model:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=50, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    return Model(module=m, config=m.config)


def test_jsonable_handles_tensors_numpy_and_nan():
    import numpy as np

    out = jsonable({"a": torch.tensor(2.5), "b": torch.arange(3), "c": np.float32(1.5), "d": float("nan"), 4: (1, 2),
                    "e": {"q_proj", "k_proj", "v_proj"}})
    assert out == {"a": 2.5, "b": [0, 1, 2], "c": 1.5, "d": "nan", "4": [1, 2], "e": ["k_proj", "q_proj", "v_proj"]}
    json.dumps(out)


def test_layer_widths_and_none_for_non_llm():
    assert layer_widths(tiny())[2] == {"layer": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 50}
    assert layer_widths(Model(module=torch.nn.Linear(2, 2))) is None


def test_report_files(tmp_path):
    model = tiny()
    model.history.append(PassRecord("magnitude", True, 0.5, {"params_removed": torch.tensor(960), "sparsity": 0.2}))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    before = layer_widths(model)
    report = build_report(
        model, tmp_path, formats=["hf"],
        verification={"hf": {"check": "reload + logits", "max_abs_diff": 0.0, "atol": 1e-4, "ok": True}},
        input_info={"path": "in", "format": "hf", "parameters": 99999, "bytes": 4000},
        recipe={"name": "magnitude-20", "description": "d"},
    )
    write_report(report, tmp_path, before)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["output"]["files"] == {"model.safetensors": 1000} and data["output"]["bytes"] == 1000
    assert data["output"]["parameters"] == model.num_parameters()
    assert data["passes"][0]["stats"]["params_removed"] == 960
    assert len(data["layers"]) == 3 and data["plot"] == "layer_widths.png"
    png = (tmp_path / "layer_widths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (tmp_path / "report.md").read_text()
    assert "| magnitude | True | params_removed=960, sparsity=0.2 |" in md
    assert md.split("\n## Timings\n")[1].count("| magnitude | 0.50 |") == 1  # timings only in the last section
    assert "| hf | reload + logits | ok | 0 | 0.0001 |" in md
    assert "99,999" in md


def test_markdown_without_layers_or_passes():
    report = {"input": {"path": "x", "format": "onnx", "parameters": None, "bytes": None},
              "output": {"formats": ["onnx"], "parameters": 10, "files": {}, "bytes": 0},
              "passes": [], "verification": {}, "layers": None}
    md = render_markdown(report)
    assert "(none)" in md and "Per-layer" not in md


def test_path_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"12345")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"123")
    assert path_bytes(tmp_path) == 8 and path_bytes(tmp_path / "a") == 5 and path_bytes(tmp_path / "zz") is None
