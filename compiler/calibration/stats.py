"""Statistics over calibration tokens, collected layer by layer in one pass.

    stats = collect_input_stats(model, tokens, ["model.layers.3.mlp.down_proj", ...], gram=True)
    stats[name].mean / .var / .sqnorm / .gram / .count
    layer = collect_layer_stats(model, tokens, names, block_angles=True, outputs=["model.layers.3.mlp"])
    layer.inputs[name]; layer.block_angle[i]    # mean arccos(cos(h_in, h_out)) / pi of decoder layer i
    layer.outputs["model.layers.3.mlp"]         # the same moments of what that module returns

Decoder layers run one at a time on cached hidden states (`layerwise.DecoderStream`); modules
outside the decoder layers (an lm_head) are measured in one ordinary forward. Per batch, sums are
taken in float32 around a per-channel shift and accumulated in float64 (`MomentAccumulator`).
Block angles compare each token's hidden state entering and leaving a decoder layer; the cosine
is clamped to [-1, 1] before arccos, since tokens with huge activations pass some layers nearly
unchanged and round to a cosine just above 1 (NaN otherwise).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from slimc.compiler.calibration.layerwise import DecoderStream, decoder_layer_index, input_hooks, output_hooks, token_batches
from slimc.compiler.model import Model
from slimc.errors import SlimcError


@dataclass
class InputStats:
    """Statistics of the input of one module over all calibration tokens (float64; the Gram matrix is
    kept in float32, see `MomentAccumulator.result`)."""

    count: int
    mean: torch.Tensor  # [in]
    var: torch.Tensor  # [in], population variance
    sqnorm: torch.Tensor  # [in], sum over tokens of x^2
    gram: torch.Tensor | None = None  # [in, in], sum over tokens of x x^T, float32

    def covariance(self) -> torch.Tensor:
        """Population covariance E[(x - mean)(x - mean)^T]; needs the Gram matrix."""
        if self.gram is None:
            raise ValueError("covariance needs statistics collected with gram=True")
        return self.gram.double() / self.count - torch.outer(self.mean, self.mean)


class MomentAccumulator:
    """Shifted sums: per batch in float32 around a per-channel shift, accumulated in float64.

    Subtracting a shift close to the mean (the first batch's mean) before summing x and x^2 keeps the
    variance accurate when |mean| >> std, at the cost of one pass; reductions over tokens in float32
    are 5-20x cheaper than float64 or `var_mean` over dim 0 on CPU.
    """

    def __init__(self, gram: bool):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None  # sum of (x - shift), float64
        self.s2: torch.Tensor | None = None  # sum of (x - shift)^2, float64
        self.want_gram = gram
        self.gram: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        if self.shift is None:
            # the first batch's mean, not its first token: position 0 often carries outliers
            self.shift = x.sum(0) / n
            self.s1 = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.s2 = torch.zeros_like(self.s1)
        d = x - self.shift
        self.s1 += d.sum(0).double()
        self.s2 += (d * d).sum(0).double()
        self.count += n
        if self.want_gram:
            # float32 product per batch (fast), accumulated in float64 across batches
            g = (x.T @ x).double()
            if self.gram is None:
                self.gram = g
            else:
                self.gram += g

    def result(self) -> InputStats:
        if self.shift is None:
            raise RuntimeError("no calibration tokens reached this module")
        n = self.count
        shift = self.shift.double()
        m1 = self.s1 / n
        var = (self.s2 / n - m1 * m1).clamp_min(0.0)
        sqnorm = self.s2 + 2.0 * shift * self.s1 + n * shift * shift
        # Each batch's product is a float32 matmul already, so storing the float64 sum in float32 costs
        # one more rounding of the same size and halves what the statistics hold (SmolLM2's 30
        # down_proj + o_proj Grams: 0.65 GB in float64). Consumers compute in float64.
        gram = None if self.gram is None else self.gram.float()
        return InputStats(n, shift + m1, var, sqnorm, gram)


def accumulators(names: list[str], gram: bool) -> dict[str, MomentAccumulator]:
    return {name: MomentAccumulator(gram) for name in names}


def feed(accs: dict[str, MomentAccumulator]):
    """An `input_hooks` callback that adds each input to its module's accumulator."""
    return lambda name, x: accs[name].add(x)


@dataclass
class LayerStats:
    """What one layer-by-layer pass measured: module inputs and, on request, module outputs (the same
    moments, `InputStats` of what the module returns) and block angles."""

    inputs: dict[str, InputStats]
    block_angle: list[float] | None = None  # per decoder layer, mean over tokens of arccos(cos)/pi
    outputs: dict[str, InputStats] = field(default_factory=dict)


def token_angles(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """arccos(cos(h_in, h_out)) / pi per token (float64), the cosine clamped to [-1, 1]."""
    a = h_in.reshape(-1, h_in.shape[-1]).double()
    b = h_out.reshape(-1, h_out.shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)
    return torch.arccos(cos) / torch.pi


def collect_input_stats(
    model: Model | nn.Module,
    tokens: torch.LongTensor,
    modules: list[str],
    *,
    gram: bool = False,
    batch_size: int = 8,
) -> dict[str, InputStats]:
    """Input statistics of each named module over all tokens of `tokens` ([n, seq_len] ids).

    Layers after the last requested one are never run.
    """
    return collect_layer_stats(model, tokens, modules, gram=gram, batch_size=batch_size).inputs


class _Side:
    """The modules measured on one side (their inputs, or their outputs): accumulators, which decoder
    layer each runs in (None: outside the layers) and the finished statistics."""

    def __init__(self, module: nn.Module, names: Sequence[str], hooks: Callable, gram: bool):
        self.names = list(names)
        self.hooks = hooks
        self.accs = accumulators(self.names, gram)
        self.done: dict[str, InputStats] = {}
        self.in_layer: dict[int, list[str]] = {}
        self.outside: list[str] = []
        for name in self.names:
            idx = decoder_layer_index(module, name)
            (self.outside if idx is None else self.in_layer.setdefault(idx, [])).append(name)

    def finish(self, names: Sequence[str]) -> None:
        for name in names:
            self.done[name] = self.accs.pop(name).result()

    def results(self) -> dict[str, InputStats]:
        self.finish(list(self.accs))
        return {name: self.done[name] for name in self.names}


@contextlib.contextmanager
def _watching(module: nn.Module, sides: Sequence[_Side], names_of: Callable[[_Side], list[str]]) -> Iterator[None]:
    """Every side's hooks on the modules `names_of(side)` picks, while active."""
    with contextlib.ExitStack() as stack:
        for side in sides:
            stack.enter_context(side.hooks(module, names_of(side), feed(side.accs)))
        yield


@torch.no_grad()
def collect_layer_stats(
    model: Model | nn.Module,
    tokens: torch.LongTensor,
    modules: list[str],
    *,
    gram: bool = False,
    block_angles: bool = False,
    outputs: list[str] | tuple[str, ...] = (),
    batch_size: int = 8,
) -> LayerStats:
    """Input statistics of the named modules, output statistics of the `outputs` modules (mean,
    variance, second moment; Gram too with `gram`) and, with `block_angles`, every decoder layer's mean
    angular distance between its input and output hidden states, from one layer-by-layer pass."""
    module = model.module if isinstance(model, Model) else model
    if module is None:
        raise SlimcError("collect_input_stats needs a PyTorch model (this one was loaded from ONNX)")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [n, seq_len], got shape {tuple(tokens.shape)}")
    for name in [*modules, *outputs]:  # every name checked before any work
        try:
            module.get_submodule(name)
        except AttributeError:
            raise SlimcError(f"collect_input_stats: the model has no module '{name}'") from None
    sides = (_Side(module, modules, input_hooks, gram), _Side(module, outputs, output_hooks, gram))
    was_training = module.training
    module.eval()
    try:
        if any(side.outside for side in sides):
            with _watching(module, sides, lambda side: side.outside):
                for ids in token_batches(module, tokens, batch_size):
                    module(input_ids=ids, use_cache=False)
        angles: list[float] | None = None
        used = [i for side in sides for i in side.in_layer]
        if used or block_angles:
            stream = DecoderStream.capture(module, tokens, batch_size)
            last = len(stream.layers) - 1 if block_angles else max(used)
            angles = [] if block_angles else None
            for i in range(last + 1):
                with _watching(module, sides, lambda side: side.in_layer.get(i, [])):
                    hidden = stream.run(i)
                for side in sides:  # finished: its float64 sums go, one layer's at a time
                    side.finish(side.in_layer.get(i, []))
                if angles is not None:
                    per_token = torch.cat([token_angles(h, o) for h, o in zip(stream.hidden, hidden)])
                    angles.append(float(per_token.mean()))
                if i < last:
                    stream.advance(i, hidden)
    finally:
        module.train(was_training)
    return LayerStats(sides[0].results(), angles, sides[1].results())
