"""LLM structured pruning as a family: the machinery FLAP, CFSP, NIRVANA and `llm-prune` share.

    units        per decoder layer, the prunable attention units (KV groups) and MLP units (neurons),
                 their real parameter cost and the output-projection columns each owns
    criteria     unit scores: FLAP's IFV / WIFV / WIFN, Wanda-sp, CFSP's fine score, NIRVANA's and
                 Taylor's saliency L1, magnitude (a registry; pure tensor maths)
    allocators   which units to keep: uniform, one global cost-weighted pool (FLAP AL-AM), per-module
                 pools, two pools with a ratio gamma (NIRVANA), block importance through a sigmoid
                 (CFSP); rounding to multiples and per-layer floors (a registry; pure tensor maths)
    compensation what the kept weights absorb of the removed ones: mean bias, least squares (lsq),
                 and sequential least squares layer by layer (lsq-seq)
    pruner       `StructuredPrune`, the pass every method is a configuration of: collect the
                 statistics the criterion and compensation need in one layer-by-layer pass (and a
                 backward for saliency), score, allocate, compensate, cut with the one surgery

Statistics come from `compiler.calibration` (`stats.collect_layer_stats`, `gradients.parameter_saliency`).
"""
