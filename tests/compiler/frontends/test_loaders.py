"""Loaders: every supported format reads, every bad input is a one-line SlimcError, inputs untouched."""

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimc.compiler.frontends.loaders import check_safetensors, load, resolve_alias
from slimc.errors import SlimcError


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*") if path.is_dir() else [path]):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def hf_dir(tmp_path):
    m = tiny_llama()
    out = tmp_path / "tiny"
    m.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out, m


def _logits(module, ids):
    with torch.no_grad():
        return module(input_ids=ids, use_cache=False).logits


def test_hf_dir_loads_with_tokenizer_and_is_untouched(hf_dir):
    path, ref = hf_dir
    before = digest(path)
    model = load(path)
    assert model.source_format == "hf" and model.is_causal_lm
    assert model.tokenizer is not None and model.tokenizer("w3 w5")["input_ids"] == [3, 5]
    ids = torch.randint(0, 128, (2, 7))
    assert torch.equal(_logits(model.module, ids), _logits(ref, ids))
    assert model.module.lm_head.weight is model.module.model.embed_tokens.weight  # tie survives
    assert digest(path) == before


def test_state_dict_needs_config(hf_dir, tmp_path):
    path, ref = hf_dir
    sd = tmp_path / "weights.pt"
    torch.save(ref.state_dict(), sd)
    with pytest.raises(SlimcError, match="--config"):
        load(sd)
    model = load(sd, config=str(path))
    ids = torch.randint(0, 128, (1, 5))
    assert torch.equal(_logits(model.module, ids), _logits(ref, ids))
    model = load(sd, config=str(path / "config.json"))
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())


def test_state_dict_that_does_not_fit_config(hf_dir, tmp_path):
    path, ref = hf_dir
    sd = {k: v for k, v in ref.state_dict().items() if "layers.1" not in k}
    f = tmp_path / "partial.pt"
    torch.save(sd, f)
    with pytest.raises(SlimcError, match="do not fit"):
        load(f, config=str(path))


def test_pickled_module_refused_unless_trusted(tmp_path):
    f = tmp_path / "module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 2)), f)
    with pytest.raises(SlimcError, match="--trust-pickle"):
        load(f)
    model = load(f, trust_pickle=True)
    assert isinstance(model.module, torch.nn.Sequential) and model.source_format == "pt"


def test_plain_pickle_refused(tmp_path):
    f = tmp_path / "obj.pt"
    f.write_bytes(pickle.dumps({"x": object}))
    with pytest.raises(SlimcError, match="pickled"):
        load(f)


def test_pt2_loads_with_example_inputs(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    x = torch.randn(2, 4)
    f = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (x,)), f)
    model = load(f)
    assert model.source_format == "pt2"
    assert torch.allclose(model.module(x), net(x), atol=0, rtol=0)
    (name, value), = model.example_inputs.items()
    assert torch.equal(value, x)


def test_onnx_loads(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.1] * 12)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    f = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), f)
    model = load(f)
    assert model.is_onnx and model.num_parameters() == 12


@pytest.mark.parametrize("name,content,match", [
    ("random.onnx", os.urandom(2048), "ONNX"),
    ("random.pt", b"\x13\x37" + os.urandom(100), "not a PyTorch checkpoint"),
    ("random.pt2", os.urandom(300), "pt2"),
    ("random.gguf", os.urandom(300), "GGUF"),
    ("model.xyz", b"hello", "unknown model format"),
])
def test_bad_files(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(SlimcError, match=match) as e:
        load(f)
    assert "\n" not in str(e.value)
    assert f.read_bytes() == content


def test_missing_path(tmp_path):
    with pytest.raises(SlimcError, match="no such file"):
        load(tmp_path / "nope")


def test_dir_without_config(tmp_path):
    with pytest.raises(SlimcError, match="config.json"):
        load(tmp_path)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_safetensors(hf_dir, cut):
    path, _ = hf_dir
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut])
    with pytest.raises(SlimcError, match="truncated|cut off|corrupt"):
        check_safetensors(f)
    with pytest.raises(SlimcError, match="truncated|cut off|corrupt"):
        load(path)


def test_missing_weights(hf_dir):
    path, _ = hf_dir
    (path / "model.safetensors").unlink()
    with pytest.raises(SlimcError, match="safetensors"):
        load(path)


def test_bad_config_json(hf_dir):
    path, _ = hf_dir
    (path / "config.json").write_text("{not json")
    with pytest.raises(SlimcError, match="not valid JSON"):
        load(path)


def test_alias_resolves_to_packaged_gguf():
    p = resolve_alias("smollm2")
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.is_file()


@pytest.mark.slow
def test_smollm2_gguf_loads_float32_with_tokenizer():
    model = load("smollm2")
    assert model.source_format == "gguf" and model.is_causal_lm
    assert model.module.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert 130e6 < model.num_parameters() < 140e6
    ids = model.tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3
