"""Evaluation: perplexity over non-overlapping token windows, and the held-out pydoc split.

    ppl = perplexity(model, heldout_tokens(model.tokenizer), seq_len=512, max_windows=16)

Perplexity is exp of the mean next-token negative log-likelihood over every predicted token of
every window (each window of `seq_len` tokens predicts `seq_len - 1` of them; windows do not
overlap and start at the beginning of the stream). PyTorch models run in eval mode under
`no_grad`; ONNX models run in an ONNX Runtime CPU session.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from slimc.compiler.calibration.sources import pydoc_split
from slimc.compiler.model import Model
from slimc.errors import SlimcError


def heldout_tokens(tokenizer: Any) -> torch.LongTensor:
    """The evaluation split of the built-in pydoc text: the second half of its token stream."""
    if tokenizer is None:
        raise SlimcError("evaluation on the pydoc split needs the model's tokenizer; load a model that ships one")
    return pydoc_split(tokenizer, "evaluation")


def eval_windows(tokens: torch.LongTensor, seq_len: int, max_windows: int | None) -> torch.LongTensor:
    """Non-overlapping `[n, seq_len]` windows from the start of a 1-D stream (or given windows)."""
    if seq_len < 2:
        raise SlimcError(f"seq_len must be at least 2 to predict a token (got {seq_len})")
    if tokens.dim() == 2:
        windows = tokens
    else:
        n = tokens.numel() // seq_len
        if n == 0:
            raise SlimcError(f"the text has {tokens.numel()} tokens, fewer than one window of {seq_len}; use a shorter --seq-len")
        windows = tokens[: n * seq_len].reshape(n, seq_len)
    if max_windows is not None:
        if max_windows < 1:
            raise SlimcError(f"max_windows must be >= 1 (got {max_windows})")
        windows = windows[:max_windows]
    return windows


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL (float64) and the number of predicted tokens."""
    lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
    return float(lp.double()), ids[:, 1:].numel()


@torch.no_grad()
def perplexity(
    model: Model,
    tokens: torch.LongTensor,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `tokens`."""
    windows = eval_windows(tokens, seq_len, max_windows)
    if model.is_onnx:
        return _perplexity_onnx(model, windows)
    module = model.module
    if module is None:
        raise SlimcError("perplexity needs a PyTorch or ONNX model")
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i : i + batch_size].to(device)
            # a .pt2 slimc exported is `input_ids -> logits`, called positionally
            out = module(ids) if model.source_format == "pt2" else module(input_ids=ids, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out if isinstance(out, torch.Tensor) else out[0]
            nll, n = window_nll(logits, ids)
            total, count = total + nll, count + n
    finally:
        module.train(was_training)
    return math.exp(total / count)


def _perplexity_onnx(model: Model, windows: torch.LongTensor) -> float:
    import numpy as np
    import onnxruntime as ort

    proto = _onnx_bytes(model.onnx)
    opts = ort.SessionOptions()
    sess = ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    total, count = 0.0, 0
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        feeds = {}
        for name in names:
            if name == "input_ids":
                feeds[name] = ids.numpy().astype(np.int64)
            elif name == "attention_mask":
                feeds[name] = np.ones_like(ids.numpy(), dtype=np.int64)
            elif name == "position_ids":
                feeds[name] = np.arange(ids.shape[1], dtype=np.int64)[None]
            else:
                raise SlimcError(f"ONNX model input '{name}' is not one perplexity can feed (input_ids, attention_mask, position_ids)")
        logits = torch.from_numpy(sess.run(None, feeds)[0])
        nll, n = window_nll(logits, ids)
        total, count = total + nll, count + n
    return math.exp(total / count)


def _onnx_bytes(onnx_model: Any) -> bytes:
    """Serialise an onnx_ir.Model (or an onnx ModelProto) for ONNX Runtime."""
    if hasattr(onnx_model, "SerializeToString"):
        return onnx_model.SerializeToString()
    import onnx_ir as ir

    return ir.to_proto(onnx_model).SerializeToString()


def parameter_counts(model: Model) -> dict[str, int]:
    """Total parameters (tied tensors once) and, for decoder LLMs, those inside decoder layers."""
    out = {"total": model.num_parameters()}
    if model.module is not None:
        from slimc.compiler.analysis.llm import decoder_layers

        try:
            views = decoder_layers(model)
        except SlimcError:
            return out
        mods = [model.module.get_submodule(v.prefix) for v in views]
        out["decoder_layers"] = sum(p.numel() for m in mods for p in m.parameters())
        attn_mlp = 0
        for v in views:
            for path in (v.attn, v.mlp):
                attn_mlp += sum(p.numel() for p in model.module.get_submodule(path).parameters())
        out["attention_mlp"] = attn_mlp
    return out


@torch.no_grad()
def mean_kl(reference: Model, model: Model, tokens: torch.LongTensor, batch_size: int = 8) -> float:
    """Token-mean KL(P_reference || Q_model) of the next-token distributions over `tokens` ([n, seq_len]).

    Both PyTorch models run in eval mode on the same windows, a batch at a time (peak memory: two
    batches of logits).
    """
    if reference.module is None or model.module is None:
        raise SlimcError("mean_kl compares two PyTorch models")
    total, count = 0.0, 0
    states = [(m.module, m.module.training) for m in (reference, model)]
    for m, _ in states:
        m.eval()
    try:
        for i in range(0, tokens.shape[0], batch_size):
            logp = []
            for m, _ in states:
                ids = tokens[i : i + batch_size].to(next(m.parameters()).device)
                logp.append(F.log_softmax(m(input_ids=ids, use_cache=False).logits.float(), dim=-1).cpu())
            p_log, q_log = logp
            total += float((p_log.exp() * (p_log - q_log)).sum(-1).double().sum())
            count += p_log.shape[0] * p_log.shape[1]
    finally:
        for m, was in states:
            m.train(was)
    return total / count
