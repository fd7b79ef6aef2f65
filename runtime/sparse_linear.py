"""`SparseLinear`: an N:M-sparse linear layer that stores only the kept values and their positions.

    layer = SparseLinear.from_linear(linear, 2, 4)      # linear.weight must already be 2:4 sparse
    to_sparse(model.module, ["model.layers.0.mlp.up_proj", ...], 2, 4)

State (what a checkpoint holds, per layer `<path>`): `<path>.values` [out, in*N/M] in the weight
dtype (a parameter, frozen by default), `<path>.metadata` [out, in*N/M*B/8] uint8 (a buffer; layout in
runtime/sparse_format.py; not called `meta`, which fx GraphModules reserve), `<path>.bias`.
A checkpoint's config.json names the layers: `"slimc_sparsity": {"format": "slimc-nm", "n": 2, "m": 4,
"layers": [...]}` (`sparse_config`); loaders call `prepare_sparse` to swap those nn.Linear layers for
empty SparseLinear modules before `load_state_dict`.

Forward: on CPU (and for every N:M other than 2:4) the reference path multiplies by the dense
reconstruction, cached until the packed tensors change — bit-identical to the masked nn.Linear.
On CUDA, 2:4 fp16/bf16 inputs of at most `DECODE_MAX_TOKENS` tokens go to our decode kernel when
it is built and measured faster than dense cuBLAS for that shape (`Dispatcher`); inputs of at least
`PREFILL_MIN_TOKENS` tokens likewise consider the prefill kernel (sparse tensor cores; its weight
layout is converted once, lazily, and cached on the layer). The prefill kernel compiles but has not
yet run on a GPU, so the dispatcher leaves it out unless `DISPATCHER.prefill_enabled = True`: a fast
wrong kernel would pass the timing-only choice. Turn it on by default once
`pytest -m gpu tests/cuda` has passed on a GPU.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimc.errors import SlimcError
from slimc.runtime.sparse_format import FORMAT_NAME, check_nm, index_bits, is_nm_sparse, pack, unpack

DECODE_MAX_TOKENS = 64
PREFILL_MIN_TOKENS = 256


class SparseLinear(nn.Module):
    """y = x W^T + b with W N:M-sparse, stored packed (values + metadata)."""

    values: nn.Parameter
    metadata: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int = 2,
        m: int = 4,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        check_nm(n, m, in_features)
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        kept = in_features // m * n
        dtype = dtype or torch.get_default_dtype()
        # the kept weights are parameters (counted, trainable on request: gradients reach only kept
        # positions, so training keeps the N:M pattern); the positions are a buffer
        self.values = nn.Parameter(torch.zeros(out_features, kept, device=device, dtype=dtype), requires_grad=False)
        self.register_buffer("metadata", torch.zeros(out_features, kept * index_bits(m) // 8, device=device, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._dense: torch.Tensor | None = None
        self._dense_key: tuple | None = None
        self._prefill: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prefill_key: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, n: int, m: int, mask: torch.Tensor | None = None) -> "SparseLinear":
        """Pack an nn.Linear whose weight is N:M sparse (or becomes so under `mask`)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, n, m, linear.bias is not None, w.device, w.dtype)
        packed = pack(w, n, m, mask)
        with torch.no_grad():
            layer.values.copy_(packed.values)
            layer.metadata.copy_(packed.meta)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def dense_weight(self) -> torch.Tensor:
        """The dense [out, in] weight (zeros at pruned positions), cached until values/meta change."""
        key = (self.values.data_ptr(), self.values._version, self.metadata.data_ptr(), self.metadata._version, self.values.dtype)
        if self._dense is None or self._dense_key != key:
            with torch.no_grad():
                self._dense = unpack(self.values, self.metadata, self.n, self.m, self.in_features)
            self._dense_key = key
        return self._dense

    def prefill_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill kernel's (a_vals, a_meta) (runtime/sparse24_layout.py), cached until values/meta change."""
        key = (self.values.data_ptr(), self.values._version, self.metadata.data_ptr(), self.metadata._version, self.values.dtype)
        if self._prefill is None or self._prefill_key != key:
            from slimc.runtime.sparse24_layout import to_mma_layout

            with torch.no_grad():
                self._prefill = to_mma_layout(self.values.detach(), self.metadata, self.in_features)
            self._prefill_key = key
        return self._prefill

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dense view, for code that inspects `.weight` (shapes, dtype). Not a parameter."""
        return self.dense_weight()

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the masked dense weight."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, self.values.device, self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def _apply(self, fn, recurse: bool = True):  # a device/dtype move invalidates the cached dense weight
        self._dense, self._dense_key = None, None
        self._prefill, self._prefill_key = None, None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.n == 2 and self.m == 4 and DISPATCHER.use_kernel(self, x):
            from slimc.runtime.sparse24_ops import sparse24_linear, sparse24_prefill_linear

            if x.numel() // max(x.shape[-1], 1) >= PREFILL_MIN_TOKENS:
                a_vals, a_meta = self.prefill_layout()
                return sparse24_prefill_linear(x, a_vals, a_meta, self.bias, self.out_features)
            return sparse24_linear(x, self.values, self.metadata, self.bias)
        if torch.compiler.is_compiling() or (self.values.requires_grad and torch.is_grad_enabled()):
            # export / compile traces (fake tensors have no data to cache) and training: no cache
            return F.linear(x, unpack(self.values, self.metadata, self.n, self.m, self.in_features), self.bias)
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.n}:{self.m}, bias={self.bias is not None}"


def cuda_median_ms(fn, repeats: int, warmup: int = 5) -> float:
    """Median CUDA-event time of `fn()` in ms, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


class Dispatcher:
    """Chooses, per (device, dtype, out, in, token bucket), our 2:4 kernel or dense cuBLAS.

    Our kernel is the decode kernel up to DECODE_MAX_TOKENS tokens and the prefill kernel from
    PREFILL_MIN_TOKENS on; token counts in between always take dense cuBLAS.

    The first call of a shape times both (CUDA events, median of `repeats` after warm-up) and
    caches the faster; later calls only look the answer up. During CUDA-graph capture nothing
    is timed: an unmeasured shape takes the kernel.
    """

    def __init__(self, repeats: int = 20):
        self.repeats = repeats
        self.choices: dict[tuple, bool] = {}
        self.timings: dict[tuple, tuple[float, float]] = {}  # key -> (kernel ms, dense ms)
        self.force: bool | None = None  # True/False pins the choice (tests, benchmarks)
        # the prefill kernel has never run on a GPU: it is considered only when this is switched on
        self.prefill_enabled = False

    @staticmethod
    def bucket(tokens: int) -> int:
        b = 1
        while b < tokens:
            b *= 2
        return b

    def use_kernel(self, layer: SparseLinear, x: torch.Tensor) -> bool:
        from slimc.runtime import sparse24_ops

        tokens = x.numel() // max(x.shape[-1], 1)
        if tokens >= PREFILL_MIN_TOKENS:
            if not self.prefill_enabled or not sparse24_ops.prefill_supports(x, layer.values) or not sparse24_ops.available():
                return False
        elif tokens > DECODE_MAX_TOKENS or not sparse24_ops.kernel_supports(x, layer.values) or not sparse24_ops.available():
            return False
        if self.force is not None:
            return self.force
        key = (x.device.index, x.dtype, layer.out_features, layer.in_features, self.bucket(tokens))
        if key not in self.choices:
            if torch.cuda.is_current_stream_capturing():
                return True
            k_ms, d_ms = self._measure(layer, x, self.bucket(tokens))
            self.timings[key] = (k_ms, d_ms)
            self.choices[key] = k_ms < d_ms
        return self.choices[key]

    def _measure(self, layer: SparseLinear, x: torch.Tensor, tokens: int) -> tuple[float, float]:
        from slimc.runtime.sparse24_ops import sparse24_linear, sparse24_prefill_linear

        xb = torch.randn(tokens, layer.in_features, device=x.device, dtype=x.dtype)
        dense = layer.dense_weight()
        if tokens >= PREFILL_MIN_TOKENS:
            a_vals, a_meta = layer.prefill_layout()

            def kernel():
                return sparse24_prefill_linear(xb, a_vals, a_meta, layer.bias, layer.out_features)
        else:

            def kernel():
                return sparse24_linear(xb, layer.values, layer.metadata, layer.bias)

        def time_ms(fn) -> float:
            return cuda_median_ms(fn, self.repeats, warmup=3)

        with torch.no_grad():
            k_ms = time_ms(kernel)
            d_ms = time_ms(lambda: F.linear(xb, dense, layer.bias))
        return k_ms, d_ms


DISPATCHER = Dispatcher()


def shares_weight(root: nn.Module, path: str, weight: torch.Tensor) -> bool:
    for name, p in root.named_parameters(remove_duplicate=False):
        if p is weight and not name.startswith(path + "."):
            return True
    return False


def to_sparse(module: nn.Module, layer_names: list[str], n: int, m: int) -> list[str]:
    """Swap each named nn.Linear (its weight already N:M sparse) for a SparseLinear. Returns the paths swapped.

    A weight shared with another module (tied embeddings) is refused: packing it would break the tie.
    """
    done = []
    for path in layer_names:
        try:
            lin = module.get_submodule(path)
        except AttributeError:
            raise SlimcError(f"to_sparse: the model has no module '{path}'") from None
        if isinstance(lin, SparseLinear):
            continue
        if not isinstance(lin, nn.Linear):
            raise SlimcError(f"to_sparse: '{path}' is a {type(lin).__name__}, not nn.Linear")
        if shares_weight(module, path, lin.weight):
            raise SlimcError(f"to_sparse: '{path}'.weight is shared with another module (tied); skip this layer")
        if not is_nm_sparse(lin.weight.detach(), n, m):
            raise SlimcError(f"to_sparse: '{path}' is not {n}:{m} sparse; run the nm pass on it first")
        module.set_submodule(path, SparseLinear.from_linear(lin, n, m))
        done.append(path)
    return done


def sparse_layers(module: nn.Module) -> dict[str, SparseLinear]:
    return {name: mod for name, mod in module.named_modules() if isinstance(mod, SparseLinear)}


def sparse_config(module: nn.Module) -> dict[str, Any] | None:
    """The `slimc_sparsity` entry for config.json, or None when the model has no SparseLinear."""
    layers = sparse_layers(module)
    if not layers:
        return None
    nms = {(l.n, l.m) for l in layers.values()}
    if len(nms) > 1:
        raise SlimcError(f"the model mixes N:M patterns {sorted(nms)}; one checkpoint holds one pattern")
    (n, m), = nms
    return {"format": FORMAT_NAME, "n": n, "m": m, "layers": sorted(layers)}


def prepare_sparse(module: nn.Module, sparsity_cfg: dict[str, Any]) -> list[str]:
    """Swap the listed nn.Linear layers for empty SparseLinear ones, ready for `load_state_dict`."""
    if not isinstance(sparsity_cfg, dict) or sparsity_cfg.get("format") != FORMAT_NAME:
        raise SlimcError(f"config.json slimc_sparsity: expected format '{FORMAT_NAME}', got {sparsity_cfg!r}")
    try:
        n, m, layers = int(sparsity_cfg["n"]), int(sparsity_cfg["m"]), list(sparsity_cfg["layers"])
    except (KeyError, TypeError, ValueError):
        raise SlimcError("config.json slimc_sparsity needs integer 'n', 'm' and a 'layers' list") from None
    check_nm(n, m)
    done = []
    for path in layers:
        try:
            lin = module.get_submodule(path)
        except AttributeError:
            raise SlimcError(f"config.json slimc_sparsity lists '{path}', which the model does not have") from None
        if isinstance(lin, SparseLinear):
            continue
        if not isinstance(lin, nn.Linear):
            raise SlimcError(f"config.json slimc_sparsity lists '{path}', a {type(lin).__name__}, not nn.Linear")
        w = lin.weight  # same device (meta included) and dtype as the layer it replaces
        module.set_submodule(path, SparseLinear(lin.in_features, lin.out_features, n, m, lin.bias is not None, w.device, w.dtype))
        done.append(path)
    return done


def densify(module: nn.Module) -> list[str]:
    """Replace every SparseLinear by an equivalent nn.Linear (masked dense weight). Returns the paths."""
    layers = sparse_layers(module)
    for path, layer in layers.items():
        module.set_submodule(path, layer.to_linear())
    return sorted(layers)
