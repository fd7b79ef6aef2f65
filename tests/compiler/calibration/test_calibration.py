"""Calibration sources, token windows and layer-by-layer input statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimc.compiler.calibration.sources import draw_windows, open_source, pydoc_split, pydoc_text
from slimc.compiler.calibration.stats import MomentAccumulator, collect_input_stats, collect_layer_stats
from slimc.compiler.model import Model
from slimc.errors import SlimcError


class ByteTokenizer:
    """A tokenizer stand-in: one token per UTF-8 byte (no special tokens)."""

    def __call__(self, text: str, add_special_tokens: bool = True, return_attention_mask: bool = True) -> dict:
        ids = list(text.encode("utf-8"))
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def tiny_llama(layers: int = 3, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    module = LlamaForCausalLM(cfg).eval()
    return Model(module=module, config=cfg, tokenizer=ByteTokenizer())


def test_pydoc_text_is_sorted_topics_joined_by_blank_lines():
    from pydoc_data import topics

    text = pydoc_text()
    first = sorted(topics.topics)[0]
    assert text.startswith(topics.topics[first])
    assert len(text) > 400_000
    assert text.count("\n\n") >= len(topics.topics) - 1


def test_pydoc_splits_are_the_two_halves_of_one_stream():
    tok = ByteTokenizer()
    calib, evals = pydoc_split(tok, "calibration"), pydoc_split(tok, "evaluation")
    stream = torch.tensor(list(pydoc_text().encode("utf-8")))
    assert calib.numel() == stream.numel() // 2
    assert torch.equal(torch.cat([calib, evals]), stream)


def test_windows_are_reproducible_and_drawn_from_the_calibration_half():
    tok = ByteTokenizer()
    src = open_source("pydoc")
    a = src.windows(tok, 8, 32, seed=0)
    b = src.windows(tok, 8, 32, seed=0)
    c = src.windows(tok, 8, 32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    calib = pydoc_split(tok, "calibration")
    text = bytes(calib.tolist())
    for row in a:
        assert bytes(row.tolist()) in text


def test_draw_windows_rejects_short_text():
    with pytest.raises(SlimcError, match="fewer than seq_len"):
        draw_windows(torch.arange(10), 2, 11, 0)
    assert draw_windows(torch.arange(10), 3, 10, 0).shape == (3, 10)


def test_txt_and_jsonl_sources(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world " * 20)
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"line {i} " * 5}) for i in range(10)) + "\n")
    tok = ByteTokenizer()
    assert open_source(str(txt)).windows(tok, 4, 16, 0).shape == (4, 16)
    w = open_source(str(jl)).windows(tok, 4, 16, 0)
    assert w.shape == (4, 16)
    assert b"line" in b"".join(bytes(r.tolist()) for r in w)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: "wikitext", "give 'pydoc'"),
        (lambda p: str(p / "missing.txt"), "does not exist"),
        (lambda p: (p / "bad.jsonl").write_text("{not json\n") and str(p / "bad.jsonl"), "not valid JSON"),
        (lambda p: (p / "nofield.jsonl").write_text('{"body": "x"}\n') and str(p / "nofield.jsonl"), "'text' field"),
        (lambda p: (p / "empty.txt").write_text("  \n") and str(p / "empty.txt"), "empty"),
    ],
)
def test_bad_sources_raise_slimc_error(tmp_path, make, match):
    with pytest.raises(SlimcError, match=match):
        open_source(make(tmp_path)).windows(ByteTokenizer(), 1, 4, 0)


def test_source_without_tokenizer_says_what_to_do():
    with pytest.raises(SlimcError, match="tokenizer"):
        open_source("pydoc").windows(None, 1, 4, 0)


def _reference_inputs(model: Model, tokens: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Inputs of each module from one ordinary full forward (the thing layer-by-layer must match)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hs = [
        model.module.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
        for n in names
    ]
    with torch.no_grad():
        model.module(input_ids=tokens, use_cache=False)
    for h in hs:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def test_layerwise_stats_match_a_full_forward():
    model = tiny_llama()
    tokens = torch.randint(0, 256, (10, 12), generator=torch.Generator().manual_seed(3))
    names = ["model.layers.0.self_attn.o_proj", "model.layers.2.mlp.down_proj", "model.layers.1.mlp.up_proj", "lm_head"]
    stats = collect_input_stats(model, tokens, names, gram=True, batch_size=3)
    ref = _reference_inputs(model, tokens, names)
    for n in names:
        x = ref[n]
        st = stats[n]
        assert st.count == 120
        torch.testing.assert_close(st.mean, x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.var, x.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.sqnorm, (x * x).sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.gram.double(), x.T @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st.covariance(), torch.cov(x.T, correction=0), rtol=1e-4, atol=1e-5)
        assert st.mean.dtype == torch.float64 and st.gram.dtype == torch.float32  # the Gram is held in float32


def test_layerwise_output_moments_match_a_full_forward():
    """Output moments in the same layer-by-layer pass: a linear, an MLP, a whole decoder layer (tuple or
    tensor output, its hidden state) and the final norm outside the layers."""
    model = tiny_llama()
    tokens = torch.randint(0, 256, (6, 10), generator=torch.Generator().manual_seed(4))
    outs = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp", "model.layers.2", "model.norm"]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in outs}

    def keep(n):
        def hook(_m, _a, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            seen[n].append(out.reshape(-1, out.shape[-1]))
        return hook

    hs = [model.module.get_submodule(n).register_forward_hook(keep(n)) for n in outs]
    with torch.no_grad():
        model.module(input_ids=tokens, use_cache=False)
    for h in hs:
        h.remove()
    result = collect_layer_stats(model, tokens, ["model.layers.1.mlp.down_proj"], outputs=outs, gram=True, batch_size=4)
    assert set(result.outputs) == set(outs) and set(result.inputs) == {"model.layers.1.mlp.down_proj"}
    for n in outs:
        x = torch.cat(seen[n]).double()
        st = result.outputs[n]
        assert st.count == 60
        torch.testing.assert_close(st.mean, x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.var, x.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.covariance(), torch.cov(x.T, correction=0), rtol=1e-4, atol=1e-5)


def test_unknown_module_is_a_slimc_error():
    model = tiny_llama(layers=1)
    with pytest.raises(SlimcError, match="no module"):
        collect_input_stats(model, torch.zeros(1, 4, dtype=torch.long), ["model.layers.0.mlp.nope"])


def test_variance_merge_is_accurate_with_a_large_mean():
    # naive E[x^2] - E[x]^2 in float32 loses everything here; the batch merge must not
    acc = MomentAccumulator(gram=False)
    g = torch.Generator().manual_seed(0)
    xs = [1e4 + torch.randn(50, 3, generator=g) for _ in range(7)]
    for x in xs:
        acc.add(x.float())
    st = acc.result()
    allx = torch.cat(xs).float().double()
    torch.testing.assert_close(st.var, allx.var(0, unbiased=False), rtol=1e-6, atol=1e-9)
    assert st.count == 350


# ---- token-id sources: calibration without a tokenizer ---------------------------------------


def _ids(n: int = 6, length: int = 40) -> torch.Tensor:
    return torch.randint(0, 250, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["pt", "pt-list", "pt-dict", "npy", "jsonl"])
def test_token_files_give_one_stream_of_their_rows(tmp_path, kind):
    ids = _ids()
    path = tmp_path / f"ids.{kind.split('-')[0]}"
    if kind == "pt":
        torch.save(ids, path)
    elif kind == "pt-list":
        torch.save([r.tolist() for r in ids], path)
    elif kind == "pt-dict":
        torch.save({"input_ids": ids}, path)
    elif kind == "npy":
        np.save(path, ids.numpy().astype(np.int32))
    else:
        path.write_text("\n".join(json.dumps({"input_ids": r.tolist()}) for r in ids) + "\n\n")
    src = open_source(str(path))
    assert not src.needs_tokenizer
    assert torch.equal(src.tokens(None), ids.reshape(-1))
    w = src.windows(None, 5, 16, seed=2)  # no tokenizer needed
    assert w.shape == (5, 16) and w.dtype == torch.long
    assert torch.equal(w, src.windows(None, 5, 16, seed=2))


@pytest.mark.parametrize(
    "write, match",
    [
        (lambda p: torch.save(torch.randn(3, 8), p), "integers"),
        (lambda p: torch.save(torch.tensor([[1, -2, 3]]), p), ">= 0"),
        (lambda p: torch.save(torch.zeros(0, dtype=torch.long), p), "no token ids"),
        (lambda p: torch.save({"ids": object()}, p), "torch.save"),  # a pickle that is not plain data: refused
        (lambda p: p.write_bytes(b"garbage"), "torch.save"),
    ],
)
def test_bad_pt_token_files(tmp_path, write, match):
    path = tmp_path / "ids.pt"
    write(path)
    with pytest.raises(SlimcError, match=match):
        open_source(str(path)).tokens(None)


def test_bad_npy_and_jsonl_token_files(tmp_path):
    npy = tmp_path / "ids.npy"
    np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SlimcError, match="npy"):
        open_source(str(npy)).tokens(None)
    jl = tmp_path / "ids.jsonl"
    jl.write_text(json.dumps({"input_ids": [1, 2]}) + "\n" + json.dumps({"input_ids": [1, "x"]}) + "\n")
    with pytest.raises(SlimcError, match=":2: expected an object with an 'input_ids' list of integers"):
        open_source(str(jl)).tokens(None)


def test_text_sources_still_need_a_tokenizer_and_say_how_to_avoid_it(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello " * 100)
    with pytest.raises(SlimcError, match="token ids"):
        open_source(str(txt)).windows(None, 1, 4, 0)


def test_calibration_tokens_checks_the_vocabulary():
    from slimc.compiler.calibration.sources import calibration_tokens

    ids = torch.tensor([[1, 2, 300]])
    assert calibration_tokens(ids, "pydoc", None, 1, 3, 0)[0] is ids  # ready windows are used as they are
    with pytest.raises(SlimcError, match="outside the model's vocabulary of 256"):
        calibration_tokens(ids, "pydoc", None, 1, 3, 0, vocab_size=256)
