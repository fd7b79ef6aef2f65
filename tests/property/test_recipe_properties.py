"""Property tests of recipes: any composition of registered passes runs or fails with a `SlimcError`.

Recipes are drawn from the pass registry (`compiler.pipeline.passes.PASSES`) and from the shipped
recipes: one to three passes in any order (stage order broken too), each with options drawn from its
pydantic config: in range, out of range, of the wrong type, and unknown keys. They run through
`slimc.api.compress` on a tiny random Llama (with a tiny tokenizer, calibrated on the built-in
`pydoc` source) and on a tiny CNN. The property: `compress` returns a model that still runs on its
probe input, or raises `SlimcError`; a `PipelineError` (a `SlimcError` that wraps whatever a pass
raised) must wrap a `SlimcError` too, since any other exception inside a pass is a bug.

Calibration sizes (samples, seq_len, KL windows, draws) are drawn small so every example stays cheap.
"""

from __future__ import annotations

import functools
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic.fields import FieldInfo
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import slimc.api as api
from slimc.compiler.model import Model
from slimc.compiler.pipeline.instruments import outputs, probe_inputs
from slimc.compiler.pipeline.passes import PASSES
from slimc.compiler.pipeline.recipes import Recipe, shipped_recipes
from slimc.errors import PipelineError, SlimcError

from tiny_tokenizer import save_tiny_tokenizer

PROPERTY = settings(deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# options that set how much calibration work a pass does: drawn from small ranges only
SMALL = {"samples": (1, 3), "seq_len": (2, 12), "kl_samples": (1, 2), "kl_seq_len": (2, 8), "kl_draws": (1, 2),
         "batch_size": (1, 4), "block_size": (1, 16)}
CHEAP = {"samples": 2, "seq_len": 8, "kl_samples": 2, "kl_seq_len": 4, "batch_size": 2}  # set unless drawn
JUNK = st.one_of(st.text(max_size=6), st.lists(st.integers(-2, 2), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
                 st.none(), st.floats(allow_nan=True, allow_infinity=True), st.booleans())


# ---- models ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tokenizer():
    return AutoTokenizer.from_pretrained(save_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="slimc-tok-")), 128))


@functools.lru_cache(maxsize=None)
def _llama() -> Model:
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=64)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    return Model(module=m, config=m.config, tokenizer=_tokenizer(), source_format="hf")


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(h + self.c2(h))
        return self.fc(h.mean((2, 3)))


@functools.lru_cache(maxsize=None)
def _cnn() -> Model:
    torch.manual_seed(0)
    return Model(module=TinyCNN().eval(), example_inputs={"x": torch.randn(1, 3, 8, 8)})


MODELS = {"llama": _llama, "cnn": _cnn}


# ---- options drawn from a pass's config -----------------------------------------------------------


def _bounds(info: FieldInfo) -> dict[str, float]:
    out = {}
    for m in info.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(m, key, None) is not None:
                out[key] = getattr(m, key)
    return out


def _valid(name: str, annotation: Any, info: FieldInfo) -> st.SearchStrategy:
    """Values the field accepts (small ones where the field sizes calibration work)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return st.one_of(*[_valid(name, a, info) for a in args])
    if annotation is type(None):
        return st.none()
    if origin is typing.Literal:
        return st.sampled_from(args)
    if annotation is bool:
        return st.booleans()
    b = _bounds(info)
    if annotation is int:
        if name in SMALL:
            lo, hi = SMALL[name]
            return st.integers(max(lo, int(b.get("ge", b.get("gt", lo - 1) + 1))), hi)
        lo = int(b["ge"]) if "ge" in b else int(b["gt"]) + 1 if "gt" in b else -3
        return st.integers(lo, lo + 8)
    if annotation is float:
        lo = b.get("ge", b.get("gt", -2.0))
        hi = b.get("le", b.get("lt", lo + 4.0))
        return st.floats(lo, hi, exclude_min="gt" in b, exclude_max="lt" in b, allow_nan=False)
    if annotation is str:
        return st.sampled_from(["pydoc", "pydoc", "no-such-file.txt", ""])
    if origin in (list, tuple):
        return st.lists(st.sampled_from(["mlp.neuron", "attention.kv_group", "conv.channel", "*embed*", "lm_head", "?"]), max_size=3)
    return JUNK


def _invalid(name: str, annotation: Any, info: FieldInfo) -> st.SearchStrategy:
    """Values out of the field's range, or of the wrong type."""
    b = _bounds(info)
    wrong = [JUNK]
    if "ge" in b:
        wrong.append(st.just(b["ge"] - 1))
    if "gt" in b:
        wrong.append(st.just(b["gt"]))
    if "le" in b:
        wrong.append(st.just(b["le"] + 1))
    if "lt" in b:
        wrong.append(st.just(b["lt"]))
    if typing.get_origin(annotation) is typing.Literal:
        wrong.append(st.just("no-such-choice"))
    return st.one_of(*wrong)


@st.composite
def pass_options(draw, pass_name: str) -> dict[str, Any]:
    fields = PASSES[pass_name].Config.model_fields
    opts: dict[str, Any] = {k: v for k, v in CHEAP.items() if k in fields}
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)) if fields else []:
        info = fields[key]
        how = draw(st.sampled_from(["valid"] * 5 + ["invalid"]))
        strategy = _valid if how == "valid" else _invalid
        opts[key] = draw(strategy(key, info.annotation, info))
    if draw(st.integers(0, 9)) == 0:
        opts[draw(st.sampled_from(["sparsty", "unknown", "n_samples"]))] = 1
    return opts


@st.composite
def recipes(draw) -> Recipe:
    names = sorted(PASSES)
    passes = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names + ["no-such-pass"] if draw(st.integers(0, 19)) == 0 else names))
        passes.append((name, draw(pass_options(name)) if name in PASSES else {}))
    return Recipe("property", "drawn by hypothesis", 1, passes)


# ---- the property --------------------------------------------------------------------------------


def compress_or_refuse(model_name: str, recipe: Recipe | str, overrides: tuple[str, ...] = (),
                       check_passes: bool = False) -> tuple[Model | None, str]:
    """Run the recipe on a fresh copy of the model: (the compressed model or None when refused, what happened).

    Any exception but a `SlimcError` fails the test, and so does a `PipelineError` whose cause is not one.
    """
    model = MODELS[model_name]().clone()
    try:
        out = api.compress(model, recipe, overrides=list(overrides), check_passes=check_passes)
    except PipelineError as e:
        if not isinstance(e.cause, SlimcError):
            raise AssertionError(f"pass '{e.failed}' raised {type(e.cause).__name__}: {e.cause}") from e.cause
        return None, f"refused while running {e.failed}"
    except SlimcError:
        return None, "refused before running"
    outputs(out, probe_inputs(out))  # the compressed model still runs
    return out, "ran"


@pytest.mark.parametrize("model_name", sorted(MODELS))
@settings(PROPERTY, max_examples=25)
@given(recipe=recipes(), check_passes=st.booleans())
def test_random_recipes_run_or_fail_with_a_slimc_error(model_name, recipe, check_passes):
    event(compress_or_refuse(model_name, recipe, check_passes=check_passes)[1])  # --hypothesis-show-statistics


def _shipped_with_overrides():
    shipped = sorted(shipped_recipes())

    @st.composite
    def shipped_case(draw):
        name = draw(st.sampled_from(shipped))
        (pname, _), = [next(iter(p.items())) for p in yaml.safe_load(shipped_recipes()[name].read_text())["passes"]]
        fields = PASSES[pname].Config.model_fields
        sets = [f"{pname}.{k}={v}" for k, v in CHEAP.items() if k in fields]
        for key in draw(st.lists(st.sampled_from(sorted(fields) + ["bogus"]), max_size=3, unique=True)):
            if key == "bogus":
                sets.append(draw(st.sampled_from([f"{pname}.bogus=1", "nodot=1", f"other.{key}=2", f"{pname}.sparsity"])))
                continue
            info = fields[key]
            value = draw((_valid if draw(st.booleans()) else _invalid)(key, info.annotation, info))
            sets.append(f"{pname}.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
        return name, tuple(sets)

    return shipped_case()


@settings(PROPERTY, max_examples=15)
@given(case=_shipped_with_overrides())
def test_shipped_recipes_with_random_overrides_run_or_fail_with_a_slimc_error(case):
    name, sets = case
    event(compress_or_refuse("llama", name, sets)[1])


# ---- regression tests: examples the properties found ---------------------------------------------


def test_attn_sparsity_that_cannot_reach_the_sparsity_is_a_slimc_error():
    """flap UL-MM with attn_sparsity 0.5 above sparsity 0.2 asked the MLP to remove -0.2: a ValueError inside the pass."""
    cheap = {k: v for k, v in CHEAP.items() if k in PASSES["flap"].Config.model_fields}
    recipe = Recipe("property", "", 1, [("flap", {**cheap, "sparsity": 0.2, "structure": "UL-MM", "attn_sparsity": 0.5})])
    with pytest.raises(PipelineError) as e:
        api.compress(_llama().clone(), recipe)
    assert isinstance(e.value.cause, SlimcError) and "attn_sparsity" in str(e.value)


def test_tiny_block_sigmoid_temperature_runs():
    """llm-prune-20 with temperature 2e-220 saturated every sigmoid to 0 and divided 0 by 0 (NaN widths)."""
    sets = [f"llm-prune.{k}={v}" for k, v in CHEAP.items() if k in PASSES["llm-prune"].Config.model_fields]
    assert compress_or_refuse("llama", "llm-prune-20", (*sets, "llm-prune.temperature=2.1453903255525083e-220"))[1] == "ran"


def test_vanishing_sparsegpt_damping_still_factorises():
    """nm-2of4-sparsegpt with damp 5e-324 on 16 tokens: the rank-deficient Gram matrix stayed undamped
    through every retry and SparseGPT raised LinAlgError."""
    sets = [f"nm.{k}={v}" for k, v in CHEAP.items() if k in PASSES["nm"].Config.model_fields]
    assert compress_or_refuse("llama", "nm-2of4-sparsegpt", (*sets, "nm.damp=5.0e-324"))[1] == "ran"
