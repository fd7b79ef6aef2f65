"""Layer-by-layer execution of a decoder on calibration batches: the one driver calibrating passes share.

    stream = DecoderStream.capture(module, tokens, batch_size=8)  # hidden states entering layer 0
    for i in range(last + 1):
        with input_hooks(module, names_in_layer_i, on_input):     # on_input(name, x) per forward
            stream.run(i)                                          # layer i on every batch
        ...                                                        # e.g. prune layer i
        stream.advance(i)                                          # its outputs enter layer i + 1

The model runs only up to its first decoder layer once per batch; the keyword arguments that
layer receives (rotary position embeddings, attention mask, ...) are the same for every layer,
so any layer can run on cached hidden states as `layer(hidden, **kwargs)`. Peak memory is one
layer's activations per batch plus the weights. `fork` gives a second stream over the same
batches (a dense and a pruned stream side by side); `run_until` stops a layer at the input of
one of its modules.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from slimc.compiler.analysis.llm import find_layer_list
from slimc.errors import SlimcError


class StopForward(Exception):
    """Raised by a hook to end a forward early (the rest of the model is not needed)."""


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, tuple) else out


def token_batches(module: nn.Module, tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """`[n, seq_len]` token ids cut into batches on the module's device."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [n, seq_len], got shape {tuple(tokens.shape)}")
    device = next(module.parameters()).device
    return [tokens[i : i + batch_size].to(device) for i in range(0, tokens.shape[0], batch_size)]


def decoder_layer_index(module: nn.Module, path: str) -> int | None:
    """Index of the decoder layer that holds the module at `path`, or None (embeddings, lm_head)."""
    found = find_layer_list(module)
    if found is None or not path.startswith(found[0] + "."):
        return None
    head = path[len(found[0]) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@contextlib.contextmanager
def _module_hooks(root: nn.Module, names: Sequence[str], register: Callable[[nn.Module, str], Any]) -> Iterator[None]:
    """While active, `register(module, name)`'s hook handle is held for every named submodule."""
    handles = []
    try:
        for name in names:
            try:
                mod = root.get_submodule(name)
            except AttributeError:
                raise SlimcError(f"calibration: the model has no module '{name}'") from None
            handles.append(register(mod, name))
        yield
    finally:
        for h in handles:
            h.remove()


def input_hooks(root: nn.Module, names: Sequence[str], on_input: Callable[[str, torch.Tensor], None]):
    """While active, every forward of a named submodule calls `on_input(name, its first input)`."""
    return _module_hooks(root, names, lambda mod, name: mod.register_forward_pre_hook(lambda _m, args: on_input(name, args[0])))


def output_hooks(root: nn.Module, names: Sequence[str], on_output: Callable[[str, torch.Tensor], None]):
    """While active, every forward of a named submodule calls `on_output(name, its (first) output)`
    (a decoder layer returns a tuple whose first entry is the hidden state)."""

    def first(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, (tuple, list)) else out

    return _module_hooks(root, names, lambda mod, name: mod.register_forward_hook(lambda _m, _a, out: on_output(name, first(out))))


class DecoderStream:
    """Hidden states at the input of one decoder layer, per calibration batch, and the layers."""

    def __init__(self, layers: nn.ModuleList, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]):
        self.layers = layers
        self.hidden = hidden
        self.kwargs = kwargs

    @classmethod
    @torch.no_grad()
    def capture(cls, module: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> "DecoderStream":
        """Run the model on `tokens` up to its first decoder layer and keep that layer's inputs."""
        found = find_layer_list(module)
        if found is None:
            raise SlimcError("not a decoder LLM slimc recognises: no model.layers list of decoder layers")
        layers = found[1]
        hidden: list[torch.Tensor] = []
        kwargs: list[dict[str, Any]] = []

        def catch(_m: nn.Module, args: tuple, kw: dict) -> None:
            hidden.append(args[0] if args else kw["hidden_states"])
            kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
            raise StopForward

        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for ids in token_batches(module, tokens, batch_size):
                try:
                    module(input_ids=ids, use_cache=False)
                except StopForward:
                    pass
        finally:
            handle.remove()
        return cls(layers, hidden, kwargs)

    def fork(self) -> "DecoderStream":
        """A second stream over the same batches, starting from the same hidden states."""
        return DecoderStream(self.layers, list(self.hidden), self.kwargs)

    @torch.no_grad()
    def run(self, i: int) -> list[torch.Tensor]:
        """Outputs of layer `i` on every batch (the stream itself does not move)."""
        layer = self.layers[i]
        return [layer_output(layer(h, **kw)) for h, kw in zip(self.hidden, self.kwargs)]

    def advance(self, i: int, outputs: list[torch.Tensor] | None = None) -> None:
        """Move the stream past layer `i`: to `outputs` (from `run`), or by running the layer now."""
        self.hidden = self.run(i) if outputs is None else outputs

    @torch.no_grad()
    def run_until(self, i: int, target: nn.Module, batch: int) -> torch.Tensor:
        """The input of `target` (a module inside layer `i`) on batch `batch`; the rest of the layer is skipped."""
        got: list[torch.Tensor] = []

        def grab(_m: nn.Module, args: tuple) -> None:
            got.append(args[0].detach())
            raise StopForward

        handle = target.register_forward_pre_hook(grab)
        try:
            self.layers[i](self.hidden[batch], **self.kwargs[batch])
        except StopForward:
            pass
        finally:
            handle.remove()
        if not got:
            raise RuntimeError(f"decoder layer {i} never called the target module")
        return got[0]
