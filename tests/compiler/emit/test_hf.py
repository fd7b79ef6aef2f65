"""HF emitter: stock config when uniform, the resized form (base config + record + modeling file) otherwise; reload is exact."""

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
    assert not (tmp_path / "modeling_slimc_resized.py").exists() and "slimc_resize" not in data
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no remote code
    ids = torch.randint(0, 128, (2, 9))
    assert (logits(stock, ids) - logits(model.module, ids)).abs().max() < ATOL
    assert stock.lm_head.weight is stock.model.embed_tokens.weight
    assert verify_hf(model, tmp_path)["ok"]


def test_non_uniform_writes_per_layer_checkpoint(tmp_path):
    model = non_uniform(tiny_model())
    data, per_layer = derive_config(model)
    assert per_layer and data["model_type"] == "slimc_resized" and "auto_map" in data
    base, record = data["base_config"], data["slimc_resize"]
    # the original architecture, unchanged, and what differs from the model it builds
    assert (base["model_type"], base["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert (base["num_attention_heads"], base["num_key_value_heads"], base["intermediate_size"]) == (4, 2, 96)
    assert record["shapes"] == {
        "model.layers.0.self_attn.q_proj.weight": [32, 64], "model.layers.0.self_attn.k_proj.weight": [16, 64],
        "model.layers.0.self_attn.v_proj.weight": [16, 64], "model.layers.0.self_attn.o_proj.weight": [64, 32],
        "model.layers.0.mlp.gate_proj.weight": [48, 64], "model.layers.0.mlp.up_proj.weight": [48, 64],
        "model.layers.0.mlp.down_proj.weight": [64, 48],
        "model.layers.2.mlp.gate_proj.weight": [93, 64], "model.layers.2.mlp.up_proj.weight": [93, 64],
        "model.layers.2.mlp.down_proj.weight": [64, 93],
    }
    assert record["new_parameters"] == {"model.layers.0.self_attn.o_proj.bias": [64], "model.layers.0.mlp.down_proj.bias": [64]}
    assert record["attributes"]["model.layers.2.mlp.up_proj"] == {"out_features": 93} and record["removed_parameters"] == []
    out = tmp_path / "ckpt"
    report = save(model, out)
    assert report["output"]["written"]["hf"]["per_layer"] is True
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_slimc_resized.SlimcResizedForCausalLM"
    assert (out / "modeling_slimc_resized.py").is_file()

    ids = torch.randint(0, 128, (2, 11))
    ref = logits(model.module, ids)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote) is LlamaForCausalLM and not remote.training  # the stock class, in eval mode
    assert (logits(remote, ids) - ref).abs().max() < ATOL
    assert remote.lm_head.weight is remote.model.embed_tokens.weight
    ours = load(out)
    assert type(ours.module) is LlamaForCausalLM
    assert (logits(ours.module, ids) - ref).abs().max() < ATOL
    assert ours.num_parameters() == model.num_parameters()
    # stock loading must not silently succeed with wrong shapes
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(out)


def test_per_layer_checkpoint_round_trips_again(tmp_path):
    """A re-loaded per-layer model saves to the same resized form (idempotent)."""
    model = non_uniform(tiny_model())
    write_hf(model, tmp_path / "a")
    again = load(tmp_path / "a")
    (tmp_path / "b").mkdir()
    write_hf(again, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "config.json").read_text())
    b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert a == b


def old_slimc_llama_checkpoint(out) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A checkpoint in the Llama-only per-layer form earlier slimc versions wrote (`slimc_layers`)."""
    import shutil

    from slimc.runtime import modeling_slimc_llama as old

    layers = [{"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 40, "o_proj_bias": True, "down_proj_bias": True},
              {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "o_proj_bias": False, "down_proj_bias": False}]
    cfg = old.SlimcLlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=128, slimc_layers=layers)
    torch.manual_seed(1)
    m = old.SlimcLlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + 1.0)
    m.save_pretrained(str(out))
    data = json.loads((out / "config.json").read_text())
    data.update(model_type="slimc_llama", architectures=["SlimcLlamaForCausalLM"], slimc_layers=layers,
                auto_map={"AutoConfig": "modeling_slimc_llama.SlimcLlamaConfig",
                          "AutoModelForCausalLM": "modeling_slimc_llama.SlimcLlamaForCausalLM"})
    (out / "config.json").write_text(json.dumps(data))
    shutil.copyfile(old.__file__, out / "modeling_slimc_llama.py")
    ids = torch.randint(0, 128, (2, 9))
    return m, logits(m, ids), ids


def test_old_slimc_llama_checkpoints_still_load_and_resave_in_the_resized_form(tmp_path):
    old_dir = tmp_path / "old"
    _, ref, ids = old_slimc_llama_checkpoint(old_dir)
    back = load(old_dir)
    assert back.config.model_type == "slimc_llama"
    assert (logits(back.module, ids) - ref).abs().max() < ATOL
    remote = AutoModelForCausalLM.from_pretrained(old_dir, trust_remote_code=True).eval()
    assert (logits(remote, ids) - ref).abs().max() < ATOL
    report = save(back, tmp_path / "new")  # verified on reload
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    assert report["output"]["written"]["hf"]["per_layer"] and cfg["model_type"] == "slimc_resized"
    assert (cfg["base_config"]["model_type"], cfg["base_config"]["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert "slimc_layers" not in cfg["base_config"]
    assert cfg["slimc_resize"]["new_parameters"] == {"model.layers.0.self_attn.o_proj.bias": [64], "model.layers.0.mlp.down_proj.bias": [64]}
    assert (logits(load(tmp_path / "new").module, ids) - ref).abs().max() < ATOL


def test_record_that_does_not_match_the_weights_is_one_slimc_error(tmp_path):
    model = non_uniform(tiny_model())
    write_hf(model, tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())

    def broken(edit) -> str:
        cfg = json.loads(json.dumps(good))
        edit(cfg["slimc_resize"])
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(SlimcError) as err:
            load(tmp_path)
        text = str(err.value)
        assert "\n" not in text
        return text

    msg = broken(lambda r: r["shapes"].update({"model.layers.0.mlp.gate_proj.weight": [40, 64]}))
    assert "slimc_resize record does not match" in msg and "model.layers.0.mlp.gate_proj.weight is [48, 64] in the checkpoint" in msg
    assert "has no model.layers.0.mlp.down_proj.bias" in broken(lambda r: r["new_parameters"].pop("model.layers.0.mlp.down_proj.bias"))
    assert "has no module 'model.layers.7.mlp.up_proj'" in broken(lambda r: r["shapes"].update({"model.layers.7.mlp.up_proj.weight": [1, 64]}))
    assert "which LlamaMLP does not have" in broken(lambda r: r["attributes"].update({"model.layers.0.mlp": {"heads": 3}}))
    assert "version 9 is newer" in broken(lambda r: r.update(version=9))
    assert "expected format 'slimc-resize'" in broken(lambda r: r.update(format="other"))


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
    assert not any(again.module.get_submodule(n).values.requires_grad for n in names)  # packed values stay frozen


def test_nm_sparse_layers_combine_with_per_layer_widths(tmp_path):
    """The record describes the dense layers; slimc_sparsity packs some of them, resized ones included."""
    from slimc.runtime.sparse_linear import SparseLinear, to_sparse

    model = non_uniform(tiny_model())
    names = ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        for name in names:
            w = model.module.get_submodule(name).weight
            groups = w.view(w.shape[0], -1, 4)
            groups.scatter_(-1, groups.abs().argsort(dim=-1)[..., :2], 0.0)
    to_sparse(model.module, names, 2, 4)
    out = tmp_path / "sparse"
    report = save(model, out)
    assert report["verification"]["hf"]["max_abs_diff"] < ATOL
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "slimc_resized" and cfg["slimc_sparsity"]["layers"] == sorted(names)
    # resized layers are recorded as the dense nn.Linear they pack
    assert cfg["slimc_resize"]["shapes"]["model.layers.0.self_attn.o_proj.weight"] == [64, 32]
    assert cfg["slimc_resize"]["new_parameters"]["model.layers.0.self_attn.o_proj.bias"] == [64]
    again = load(out)
    layer = again.module.get_submodule("model.layers.0.self_attn.o_proj")
    assert isinstance(layer, SparseLinear) and (layer.in_features, layer.out_features) == (32, 64) and layer.bias is not None
    ids = torch.randint(0, 128, (2, 7))
    assert (logits(again.module, ids) - logits(model.module, ids)).abs().max() < ATOL
    with pytest.raises(ValueError, match="slimc.load"):  # packed layers need slimc, not only the modeling file
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)




def test_per_layer_checkpoint_keeps_its_tokenizer_without_remote_code(tmp_path, capfd):
    model = non_uniform(tiny_model())
    model.tokenizer = tiny_tokenizer()
    save(model, tmp_path / "out")
    capfd.readouterr()
    again = load(tmp_path / "out")
    assert again.tokenizer is not None and again.tokenizer("w9")["input_ids"] == [9]
    assert "custom code" not in capfd.readouterr().out  # never asks whether to trust the shipped modeling file


def test_a_module_the_config_cannot_build_is_refused_and_nothing_is_written(tmp_path):
    """The record resizes the stock modules; a module of another type is not something it can say."""

    class OtherMLP(nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.inner = mlp

        def forward(self, x):
            return self.inner(x)

    model = non_uniform(tiny_model())
    layer = model.module.model.layers[1]
    layer.mlp = OtherMLP(layer.mlp)
    with pytest.raises(SlimcError, match="cannot write this checkpoint: module 'model.layers.1.mlp' is a OtherMLP, not a LlamaMLP"):
        save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
