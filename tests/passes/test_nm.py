"""The `nm` pass on a tiny Llama: exact N:M, skips, packed == dense, idempotence, options, recipes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from slimc.compiler.calibration.sources import pydoc_split
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import PassContext, PassManager, get_pass
from slimc.compiler.pipeline.recipes import load_recipe
from slimc.errors import PostconditionError, SlimcError
from slimc.passes.nm import NM
from slimc.runtime.sparse_format import is_nm_sparse
from slimc.runtime.sparse_linear import SparseLinear, sparse_config


class ByteTokenizer:
    """One token per UTF-8 byte, no special tokens."""

    def __call__(self, text: str, add_special_tokens: bool = True, return_attention_mask: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


def tiny_llama(seed: int = 0, tie: bool = False) -> Model:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie,
    )
    return Model(module=LlamaForCausalLM(cfg).eval(), config=cfg, tokenizer=ByteTokenizer())


CTX = PassContext(seed=0)
SMALL = dict(samples=4, seq_len=32, batch_size=4)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(9))


def logits(model: Model) -> torch.Tensor:
    with torch.no_grad():
        return model.module(input_ids=IDS, use_cache=False).logits


def decoder_linears(model: Model) -> list[str]:
    return [p for p, m in model.module.named_modules() if isinstance(m, (nn.Linear, SparseLinear)) and ".layers." in p]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_every_decoder_linear_becomes_exactly_n_of_m(method, n, m):
    model = tiny_llama()
    head = model.module.lm_head.weight.clone()
    res = NM(n=n, m=m, method=method, format="dense", block_size=32, **SMALL)(model, CTX)
    assert res.modified
    paths = decoder_linears(model)
    assert len(paths) == 14 and res.stats["layers"] == 14
    for p in paths:
        w = model.module.get_submodule(p).weight
        g = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert int(g.max()) <= n, p
    assert torch.equal(model.module.lm_head.weight, head)  # skipped by default
    assert abs(res.stats["sparsity"] - (1 - n / m)) < 0.01
    if method != "magnitude":
        assert res.stats["calibration_tokens"] == 4 * 32


def test_packed_format_gives_the_same_logits_as_dense_format():
    dense, packed = tiny_llama(), tiny_llama()
    NM(method="wanda", format="dense", **SMALL)(dense, CTX)
    res = NM(method="wanda", format="packed", **SMALL)(packed, CTX)
    assert res.stats["layers_packed"] == 14
    assert all(isinstance(packed.module.get_submodule(p), SparseLinear) for p in decoder_linears(packed))
    assert torch.equal(logits(packed), logits(dense))
    cfg = sparse_config(packed.module)
    assert cfg["n"] == 2 and cfg["m"] == 4 and len(cfg["layers"]) == 14


@pytest.mark.parametrize("fmt", ["dense", "packed"])
def test_second_run_changes_nothing_and_says_so(fmt):
    model = tiny_llama()
    p = NM(method="sparsegpt", format=fmt, block_size=32, **SMALL)
    assert p(model, CTX).modified
    before = logits(model)
    res = p(model, CTX)
    assert not res.modified and res.stats["layers_pruned"] == 0
    assert torch.equal(logits(model), before)


def test_sparsegpt_tracks_the_dense_model_better_than_magnitude_on_held_out_text():
    held_out = pydoc_split(ByteTokenizer(), "evaluation")[: 8 * 64].reshape(8, 64)

    def out(model: Model) -> torch.Tensor:
        with torch.no_grad():
            return model.module(input_ids=held_out, use_cache=False).logits

    ref = out(tiny_llama())
    err = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_llama()
        NM(method=method, format="dense", block_size=32, samples=16, seq_len=64)(model, CTX)
        err[method] = float((out(model) - ref).norm() / ref.norm())
    # relative logit error, measured: magnitude 0.161, wanda 0.158, sparsegpt 0.124. A random tiny
    # model has no outlier features, so Wanda's edge is small here (the real-model floor is in
    # BENCHMARKS.md); SparseGPT's reconstruction must show.
    assert err["sparsegpt"] < 0.9 * err["magnitude"]
    assert err["wanda"] < 1.05 * err["magnitude"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_calibration_matches_one_shot_on_the_first_layer_only(method):
    one, seq = tiny_llama(), tiny_llama()
    NM(method=method, format="dense", block_size=32, **SMALL)(one, CTX)
    res = NM(method=method, format="dense", block_size=32, sequential=True, **SMALL)(seq, CTX)
    assert res.stats["sequential"] and res.stats["layers_pruned"] == 14
    a, b = one.module.model.layers, seq.module.model.layers
    # layer 0 sees the dense embeddings either way; layer 1 sees pruned layer-0 outputs when sequential
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        torch.testing.assert_close(b[0].get_submodule(name).weight, a[0].get_submodule(name).weight, rtol=1e-5, atol=1e-6)
    assert not torch.equal(b[1].mlp.down_proj.weight, a[1].mlp.down_proj.weight)
    for p in decoder_linears(seq):
        assert is_nm_sparse(seq.module.get_submodule(p).weight, 2, 4)


def test_skip_patterns_and_tied_heads():
    model = tiny_llama(tie=True)
    res = NM(method="magnitude", skip=["*mlp*"], format="packed", n=2, m=4)(model, CTX)
    assert res.stats["layers"] == 8  # q, k, v, o of two layers
    assert isinstance(model.module.model.layers[0].mlp.up_proj, nn.Linear)
    model = tiny_llama(tie=True)
    res = NM(method="magnitude", skip=[], format="packed")(model, CTX)
    # lm_head shares the embedding: refused quietly as a skip, never packed
    assert isinstance(model.module.lm_head, nn.Linear) and res.stats["layers"] == 14


def test_layers_that_do_not_split_into_groups_are_skipped():
    model = Model(module=nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)))
    res = NM(method="magnitude", skip=[], format="packed")(model, CTX)
    assert res.stats["layers"] == 1 and res.stats["layers_skipped"] == 1
    assert isinstance(model.module[1], SparseLinear)


def test_ensures_catches_a_layer_that_is_not_n_of_m():
    model = tiny_llama()
    p = NM(method="magnitude", format="dense")
    p(model, CTX)
    with torch.no_grad():
        model.module.model.layers[0].mlp.up_proj.weight.fill_(1.0)
    with pytest.raises(PostconditionError, match="not 2:4"):
        p.ensures(model, CTX)


def test_calibration_methods_need_a_language_model():
    model = Model(module=nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(SlimcError, match="needs a decoder language model"):
        NM(method="wanda")(model, CTX)
    NM(method="magnitude", format="dense")(model, CTX)  # data-free: any PyTorch model


def test_options_are_validated():
    with pytest.raises(ValueError, match="smaller than m"):
        NM(n=4, m=4)
    with pytest.raises(ValueError, match="multiple of m"):
        NM(n=2, m=8, block_size=12)
    with pytest.raises(ValueError):
        NM(method="random")
    with pytest.raises(ValueError):
        NM(bogus=1)
    cfg = NM(n=4, m=8, skip=["x"]).config
    assert type(cfg).model_validate(cfg.model_dump()) == cfg  # serialisable round trip


@pytest.mark.parametrize("name,method", [("nm-2of4-magnitude", "magnitude"), ("nm-2of4-wanda", "wanda"), ("nm-2of4-sparsegpt", "sparsegpt")])
def test_shipped_recipes_load_and_run(name, method):
    recipe = load_recipe(name, ["nm.samples=4", "nm.seq_len=32"])
    passes = recipe.build()
    assert get_pass("nm") is NM and passes[0].config.method == method and passes[0].config.format == "packed"
    model = PassManager(passes).run(tiny_llama(), CTX)
    assert model.history[-1].name == "nm" and model.history[-1].stats["layers_packed"] == 14
    for p in decoder_linears(model):
        assert is_nm_sparse(model.module.get_submodule(p).weight, 2, 4)


def test_packed_checkpoint_reloads_with_the_same_logits(tmp_path):
    # (ONNX and .pt2 emission of packed layers work too; kept out of the fast suite for time)
    from slimc.compiler.emit.save import save
    from slimc.compiler.frontends.loaders import load

    model = tiny_llama()
    NM(method="wanda", format="packed", **SMALL)(model, CTX)
    ref = logits(model)
    model.tokenizer = None  # the byte stand-in cannot be saved
    report = save(model, tmp_path / "out", format="hf")
    assert all(v["ok"] for v in report["verification"].values())
    cfg = __import__("json").loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["slimc_sparsity"]["format"] == "slimc-nm" and len(cfg["slimc_sparsity"]["layers"]) == 14
    again = load(tmp_path / "out")
    assert isinstance(again.module.model.layers[1].mlp.down_proj, SparseLinear)
    assert torch.equal(logits(again), ref)
