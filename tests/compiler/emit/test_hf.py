"""HF emitter: stock config when uniform, per-layer config + modeling file otherwise; reload is exact."""

import json
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.emit.hf import derive_config, verify_hf, write_hf
from slimc.compiler.emit.save import save
from slimc.compiler.frontends.loaders import load
from slimc.compiler.model import Model
from slimc.compiler.surgery import apply_plan
from slimc.errors import SlimcError

ATOL = 1e-4  # fp32 reload must reproduce the logits


def tiny_model(layers: int = 3, tie: bool = True) -> Model:
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie, max_position_embeddings=128)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    return Model(module=m, config=m.config, source_format="torch")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 128)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def logits(module, ids):
    with torch.no_grad():
        return module(input_ids=ids, use_cache=False).logits


def non_uniform(model: Model) -> Model:
    """Different KV groups / MLP widths per layer, and FLAP-style biases on o_proj/down_proj of layer 0."""
    views = decoder_layers(model)
    apply_plan(model.module, {views[0].kv_group: [1], views[0].mlp_neuron: list(range(0, 96, 2)),
                              views[2].mlp_neuron: [5, 6, 7]})
    layer0 = model.module.model.layers[0]
    for name, parent in (("o_proj", layer0.self_attn), ("down_proj", layer0.mlp)):
        old = getattr(parent, name)
        new = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(torch.randn(old.out_features) * 0.1)
        setattr(parent, name, new)
    return model


def test_uniform_prune_writes_stock_config(tmp_path):
    model = tiny_model()
    views = decoder_layers(model)
    apply_plan(model.module, {v.mlp_neuron: [0, 3, 9] for v in views} | {v.kv_group: [0] for v in views})
    data, per_layer = derive_config(model)
    assert not per_layer
    assert (data["intermediate_size"], data["num_attention_heads"], data["num_key_value_heads"]) == (93, 2, 1)
    write_hf(model, tmp_path)
    assert not (tmp_path / "modeling_slimc_llama.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no remote code
    ids = torch.randint(0, 128, (2, 9))
    assert (logits(stock, ids) - logits(model.module, ids)).abs().max() < ATOL
    assert stock.lm_head.weight is stock.model.embed_tokens.weight
    assert verify_hf(model, tmp_path)["ok"]


def test_non_uniform_writes_per_layer_checkpoint(tmp_path):
    model = non_uniform(tiny_model())
    data, per_layer = derive_config(model)
    assert per_layer and data["model_type"] == "slimc_llama" and "auto_map" in data
    assert [s["intermediate_size"] for s in data["slimc_layers"]] == [48, 96, 93]
    assert [s["num_key_value_heads"] for s in data["slimc_layers"]] == [1, 2, 2]
    assert [s["num_attention_heads"] for s in data["slimc_layers"]] == [2, 4, 4]
    assert [(s["o_proj_bias"], s["down_proj_bias"]) for s in data["slimc_layers"]] == [(True, True), (False, False), (False, False)]
    out = tmp_path / "ckpt"
    report = save(model, out)
    assert report["output"]["written"]["hf"]["per_layer"] is True
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_slimc_llama.SlimcLlamaForCausalLM"
    assert (out / "modeling_slimc_llama.py").is_file()

    ids = torch.randint(0, 128, (2, 11))
    ref = logits(model.module, ids)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert (logits(remote, ids) - ref).abs().max() < ATOL
    assert remote.lm_head.weight is remote.model.embed_tokens.weight
    ours = load(out)
    assert (logits(ours.module, ids) - ref).abs().max() < ATOL
    assert ours.num_parameters() == model.num_parameters()
    # stock loading must not silently succeed with wrong shapes
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(out)


def test_per_layer_checkpoint_round_trips_again(tmp_path):
    """A re-loaded per-layer model saves to the same per-layer form (idempotent)."""
    model = non_uniform(tiny_model())
    write_hf(model, tmp_path / "a")
    again = load(tmp_path / "a")
    (tmp_path / "b").mkdir()
    write_hf(again, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "config.json").read_text())
    b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert a["slimc_layers"] == b["slimc_layers"]


def test_untied_embeddings_stay_untied(tmp_path):
    model = tiny_model(tie=False)
    write_hf(model, tmp_path)
    result = verify_hf(model, tmp_path)
    assert result["ok"] and result["tied_embeddings"] is False


def test_verification_catches_a_wrong_checkpoint(tmp_path):
    model = tiny_model()
    write_hf(model, tmp_path)
    with torch.no_grad():
        model.module.model.norm.weight.mul_(1.5)  # the in-memory model no longer matches the files
    with pytest.raises(SlimcError, match="does not reproduce"):
        verify_hf(model, tmp_path)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    import slimc.compiler.emit.save as emit

    model = tiny_model()
    out = tmp_path / "out"

    def boom(*a, **k):
        raise SlimcError("simulated failure")

    monkeypatch.setattr(emit, "verify_hf", boom)
    with pytest.raises(SlimcError, match="simulated"):
        save(model, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left behind


def test_save_refuses_foreign_directory_and_replaces_own(tmp_path):
    model = tiny_model(layers=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(SlimcError, match="not written by slimc"):
        save(model, out)
    assert (out / "precious.txt").read_text() == "user data"
    out2 = tmp_path / "out2"
    save(model, out2)
    save(model, out2)  # a previous slimc output is replaced
    assert (out2 / "report.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out2 / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not left private


def test_tokenizer_and_generation_config_are_written(tmp_path):
    model = tiny_model(layers=1)
    model.tokenizer = tiny_tokenizer()
    write_hf(model, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "generation_config.json").is_file()
    assert load(tmp_path).tokenizer("w7")["input_ids"] == [7]


def test_nm_sparse_layers_round_trip(tmp_path):
    from slimc.runtime.sparse_linear import SparseLinear, to_sparse

    model = tiny_model(layers=2)
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        for name in names:
            w = model.module.get_submodule(name).weight
            groups = w.view(w.shape[0], -1, 4)
            drop = groups.abs().argsort(dim=-1)[..., :2]  # the two smallest of every 4
            groups.scatter_(-1, drop, 0.0)
    to_sparse(model.module, names, 2, 4)
    out = tmp_path / "sparse"
    report = save(model, out, format="all")  # ONNX and .pt2 hold the masked dense weights
    assert report["verification"]["onnx"]["max_abs_diff"] < 1e-3 and report["verification"]["pt2"]["ok"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["slimc_sparsity"] == {"format": "slimc-nm", "n": 2, "m": 4, "layers": sorted(names)}
    assert report["verification"]["hf"]["max_abs_diff"] < ATOL
    again = load(out)
    assert all(isinstance(again.module.get_submodule(n), SparseLinear) for n in names)


def test_per_layer_checkpoint_keeps_its_tokenizer_without_remote_code(tmp_path, capfd):
    model = non_uniform(tiny_model())
    model.tokenizer = tiny_tokenizer()
    save(model, tmp_path / "out")
    capfd.readouterr()
    again = load(tmp_path / "out")
    assert again.tokenizer is not None and again.tokenizer("w9")["input_ids"] == [9]
    assert "custom code" not in capfd.readouterr().out  # never asks whether to trust the shipped modeling file
