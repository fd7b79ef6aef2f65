"""`Model`: what flows through a pipeline — weights, structure, and where they came from.

A model comes from one front-end: a PyTorch `nn.Module` (Hugging Face models keep their
`config` and `tokenizer`) or an ONNX model (`onnx_ir.Model`). Passes read `module`/`onnx`; the
graph IR and its groups come from `compiler.analysis.coupling.model_graph` / `model_groups`.
`history` records every pass that ran, with its stats and time, for the report.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor a module returns: itself, the first of a tuple or list, or the first field of a
    dict / transformers ModelOutput (a causal LM's logits, an encoder's last_hidden_state), which is also
    what an exported graph returns first."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    for item in out:
        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, (tuple, list, dict)) or hasattr(item, "values"):
            return first_tensor(item)
    raise TypeError(f"the module returned no tensor ({type(out).__name__})")


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)  # what instruments measured after the pass


@dataclass
class Model:
    module: nn.Module | None = None  # torch front-end
    onnx: Any = None  # onnx_ir.Model for the ONNX front-end
    config: Any = None  # transformers.PretrainedConfig when the model is a Hugging Face model
    tokenizer: Any = None
    source: Path | None = None
    source_format: str = "torch"  # hf | gguf | pt2 | pt | onnx | torch
    history: list[PassRecord] = field(default_factory=list)
    example_inputs: dict[str, Any] | None = None  # kwargs for forward/export when not an LLM

    @property
    def is_onnx(self) -> bool:
        return self.onnx is not None

    @property
    def is_causal_lm(self) -> bool:
        return self.module is not None and self.config is not None and hasattr(self.module, "lm_head")

    def place(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """Move a PyTorch model to `device` and cast its weights to the float `dtype` (None: unchanged).

        Parameters and persistent floating buffers take `dtype`; non-persistent buffers (rotary
        `inv_freq`) keep theirs, as when transformers loads a checkpoint in that dtype, so a
        model cast here computes exactly what the same model reloaded from its checkpoint does.
        """
        if self.module is None:
            return
        if dtype is not None:
            for mod in self.module.modules():
                for name, p in mod._parameters.items():
                    if p is not None and p.is_floating_point():
                        p.data = p.data.to(dtype)
                for name, b in mod._buffers.items():
                    if b is not None and b.is_floating_point() and name not in mod._non_persistent_buffers_set:
                        mod._buffers[name] = b.to(dtype)
            if self.config is not None and hasattr(self.config, "dtype"):
                self.config.dtype = dtype
        if device is not None:
            self.module.to(device)

    def probe_ids(self, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
        """Fixed random token ids for checking a language model's outputs (verification, probes)."""
        vocab = int(getattr(self.config, "vocab_size", 0) or 100)
        return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))

    def num_parameters(self) -> int:
        """Distinct weights: a tied parameter counts once, whether the tie is one Parameter object (an
        eager model) or two Parameters viewing the same memory alike (what torch.export.load returns)."""
        if self.module is not None:
            seen: set[tuple] = set()
            total = 0
            for p in self.module.parameters():
                ptr = p.untyped_storage().data_ptr() if p.device.type != "meta" else 0
                key = (p.device, ptr, p.storage_offset(), tuple(p.shape), p.stride(), p.dtype)
                if ptr and key in seen:
                    continue
                seen.add(key)
                total += p.numel()
            return total
        return sum(int(v.const_value.size) for v in self.onnx.graph.initializers.values() if v.const_value is not None)

    def clone(self) -> "Model":
        """A deep copy of weights and structure; tokenizer and source are shared."""
        return Model(
            module=copy.deepcopy(self.module) if self.module is not None else None,
            onnx=copy.deepcopy(self.onnx) if self.onnx is not None else None,
            config=copy.deepcopy(self.config),
            tokenizer=self.tokenizer,
            source=self.source,
            source_format=self.source_format,
            history=list(self.history),
            example_inputs=self.example_inputs,
        )

    def state_shapes(self) -> dict[str, torch.Size]:
        if self.module is None:
            return {n: tuple(v.shape) for n, v in self.onnx.graph.initializers.items()}
        named = dict(self.module.named_parameters(remove_duplicate=False))
        named.update(dict(self.module.named_buffers(remove_duplicate=False)))
        return {n: t.shape for n, t in named.items()}
