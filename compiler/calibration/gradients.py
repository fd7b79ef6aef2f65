"""First-order saliency of parameters: |theta * d objective / d theta| over calibration tokens.

    sal = parameter_saliency(model, tokens, ["model.layers.0.mlp.up_proj.weight", ...], objective="max_logit")
    sal[name]   # float32 tensor shaped like the parameter

Objectives (each a mean over the whole calibration set, so micro-batches add up exactly):

    max_logit  f = mean over windows b and vocabulary entries v of max over positions t of logits[b, t, v]
               (NIRVANA's output proxy: no labels, no loss)
    loss       f = mean next-token negative log-likelihood (first-order Taylor, as LLM-Pruner)

The backward runs over micro-batches of `batch_size` windows, autograd adding each one's
gradients into `.grad` (in the parameters' dtype: a bfloat16 model sums in bfloat16, enough for a
ranking, and holds no float32 copy); only the named parameters require gradients (embeddings and the LM head
do not, so a tied head costs no gradient memory). Peak memory is the weights, one gradient per
named parameter and one micro-batch's activations; the saliency replaces each gradient in place.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slimc.compiler.calibration.layerwise import token_batches
from slimc.compiler.model import Model
from slimc.errors import SlimcError

OBJECTIVES = ("max_logit", "loss")


def _objective_sum(logits: torch.Tensor, ids: torch.Tensor, objective: str) -> torch.Tensor:
    """The micro-batch's share of the objective's sum (divided by the set's size by the caller)."""
    if objective == "max_logit":
        return logits.float().amax(dim=1).sum() / logits.shape[-1]  # sum over windows of mean_v max_t
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
    return nll


def parameter_saliency(
    model: Model | nn.Module,
    tokens: torch.LongTensor,
    params: Iterable[str],
    *,
    objective: str = "max_logit",
    batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """|theta * df/dtheta| of each named parameter, f the objective over all of `tokens` ([n, seq_len])."""
    if objective not in OBJECTIVES:
        raise SlimcError(f"unknown saliency objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")
    module = model.module if isinstance(model, Model) else model
    names = list(dict.fromkeys(params))
    named = dict(module.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in named]
    if missing:
        raise SlimcError(f"saliency: the model has no parameter {missing[0]!r}")
    by_id = {id(named[n]): named[n] for n in names}  # each tensor once: tied names share one
    saved = {id(p): p.requires_grad for p in module.parameters()}
    was_training = module.training
    module.eval()
    denom = tokens.shape[0] if objective == "max_logit" else tokens.shape[0] * (tokens.shape[1] - 1)
    saliency: dict[int, torch.Tensor] = {}
    try:
        for p in module.parameters():
            p.requires_grad_(id(p) in by_id)
            p.grad = None
        for ids in token_batches(module, tokens, batch_size):
            logits = module(input_ids=ids, use_cache=False).logits
            (_objective_sum(logits, ids, objective) / denom).backward()  # autograd adds into .grad
            del logits
        for i, p in by_id.items():  # |theta * grad| in place of the gradient: no second copy
            if p.grad is not None:
                g = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
                saliency[i] = g.mul_(p.detach().float()).abs_().cpu()
                p.grad = None
    finally:
        for p in module.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
        module.train(was_training)
    return {n: saliency.get(id(named[n]), torch.zeros(named[n].shape)) for n in names}
