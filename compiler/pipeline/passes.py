"""Pass infrastructure: `Pass`, `PassResult`, `PassContext`, `PassManager`, and the registry.

A pass is a small object with a typed, validated config (a pydantic model; unknown keys are
errors). `Pass.__call__` checks preconditions (`requires`), runs `call`, then checks
postconditions (`ensures`, which raise `PostconditionError`) — passes do not repeat those checks
themselves.

Before anything runs, `PassManager.check` refuses a pipeline whose passes cannot work on the
model or with the context (`Pass.needs`: a PyTorch module, a decoder LM, calibration tokens)
or come in the wrong order (`Pass.stage`: structured pruning, then sparsity, then quantization
last). While it runs, the manager moves the model to the context's device and dtype, times
each pass, records it in the model's history, calls the context's instruments around each pass
(`compiler.pipeline.instruments`), and on failure raises `PipelineError` naming the failing pass
and those before it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from slimc.compiler.analysis.llm import find_layer_list
from slimc.compiler.calibration.sources import CalibrationSource, calibration_tokens
from slimc.compiler.model import Model, PassRecord
from slimc.errors import PipelineError, SlimcError


class PassConfig(BaseModel):
    """Base of every pass's options: strict (unknown keys are errors), serialisable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class PassResult:
    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


Instrument = Callable[[str, str, Model], None]  # (event "start" | "end", pass name, model)


@dataclass
class PassContext:
    """What a pass may use besides the model.

    `calibration`: a calibration source (`compiler.calibration.sources`), ready `[n, seq_len]`
    token ids, or None (each pass then opens the source named in its own config).
    `device` / `dtype`: where and in which float type the passes compute; the manager moves the
    model there before the first pass (None: leave it where and as it is).
    `check_passes`: after every pass, run the model on a probe input, require finite outputs and
    record how far they moved (`instruments.OutputProbe`).
    `training`: for passes that train (HESSO): `{"data": name | path | TrainingData, "epochs": N,
    "steps": N}`, any key absent or None (the pass's own config then decides).
    """

    calibration: Any = None
    device: str | None = None
    dtype: torch.dtype | None = None
    seed: int = 0
    verify: bool = True  # run the passes' postcondition checks
    check_passes: bool = False
    instruments: list[Instrument] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)

    def notify(self, event: str, pass_name: str, model: Model) -> None:
        for inst in self.instruments:
            inst(event, pass_name, model)

    def calibration_tokens(self, model: Model, spec: str, samples: int, seq_len: int, seed: int | None) -> tuple[torch.LongTensor, str]:
        """`[n, seq_len]` token ids for a pass, and the name of their source.

        From the context's calibration (ready ids are used as they are), else from the source
        `spec` of the pass's own config; `seed` None means the context's seed.
        """
        vocab = getattr(model.config, "vocab_size", None)
        return calibration_tokens(self.calibration, spec, model.tokenizer, samples, seq_len, self.seed if seed is None else seed, vocab)


# Pipeline order: a pass of a later stage may not run before a pass of an earlier one.
STAGES = ("structure", "sparsity", "quantize")
STAGE_RULE = "structured pruning comes first, N:M/unstructured sparsity after it, quantization last"

# What a pass can need of the model and the context, checked before any pass runs.
NEEDS_TORCH = "torch"  # a PyTorch module (not an ONNX graph)
NEEDS_DECODER_LM = "decoder_lm"  # a Hugging Face causal LM with a list of decoder layers
NEEDS_CALIBRATION = "calibration"  # calibration token ids (text and a tokenizer, or ids)
NEEDS_TRAINING = "training"  # a training length: ctx.training's epochs / steps, or the pass config's own


class Pass(ABC):
    """One transformation. Subclasses set `name`, `Config`, `description` and implement `call`.

    `stage` places the pass in the pipeline order (one of STAGES, or None: anywhere);
    `needs()` names what it requires (NEEDS_*), checked by the manager before anything runs.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig
    stage: ClassVar[str | None] = None

    def __init__(self, config: PassConfig | dict | None = None, **options: Any):
        if config is None:
            config = self.Config(**options)
        elif isinstance(config, dict):
            config = self.Config(**{**config, **options})
        self.config = config

    def needs(self) -> frozenset[str]:
        """What this pass, with its options, requires of the model and the context."""
        return frozenset()

    def requires(self, model: Model, ctx: PassContext) -> None:
        """Raise SlimcError if the pass cannot run on this model."""

    def ensures(self, model: Model, ctx: PassContext) -> None:
        """Raise PostconditionError if the result breaks the pass's postcondition (runs when ctx.verify)."""

    @abstractmethod
    def call(self, model: Model, ctx: PassContext) -> PassResult: ...

    def __call__(self, model: Model, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        check_needs(self, model, ctx)
        self.requires(model, ctx)
        result = self.call(model, ctx)
        if ctx.verify:
            self.ensures(result.model, ctx)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: register a pass under its stable `name`; a duplicate name is refused."""
    name = cls.name
    if name in PASSES and PASSES[name] is not cls:
        raise ValueError(f"pass name '{name}' is already registered by {PASSES[name].__module__}")
    if cls.stage is not None and cls.stage not in STAGES:
        raise ValueError(f"pass '{name}': stage must be one of {STAGES} or None, not {cls.stage!r}")
    PASSES[name] = cls
    return cls


def unregister_pass(name: str) -> None:
    """Remove a registered pass (tests that register their own passes clean up with this)."""
    PASSES.pop(name, None)


def get_pass(name: str) -> type[Pass]:
    """The pass registered under `name`; the shipped passes register when `slimc` is imported."""
    try:
        return PASSES[name]
    except KeyError:
        raise SlimcError(f"unknown pass '{name}'; known passes: {', '.join(sorted(PASSES))}") from None


def resolve_device(name: str | None) -> str | None:
    """A torch device string, checked: a CUDA device where CUDA is absent is a SlimcError."""
    if name is None:
        return None
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SlimcError(f"device '{name}': not a torch device (use cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SlimcError(f"device '{name}': CUDA is not available on this machine; use cpu")
    return str(dev)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """float32 | bfloat16 | float16 (a name or a torch dtype), else a SlimcError."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise SlimcError(f"dtype '{dtype}': choose one of {', '.join(DTYPES)}")


def check_needs(p: Pass, model: Model, ctx: PassContext) -> None:
    """Raise SlimcError when the model or the context lacks what `p.needs()` names."""
    needs = p.needs()
    if (NEEDS_TORCH in needs or NEEDS_DECODER_LM in needs) and model.module is None:
        raise SlimcError(f"pass '{p.name}' works on PyTorch models; this one was loaded from ONNX")
    if NEEDS_DECODER_LM in needs and not (model.is_causal_lm and find_layer_list(model.module) is not None):
        kind = type(model.module).__name__
        raise SlimcError(f"pass '{p.name}' needs a decoder language model (a Hugging Face causal LM); {kind} is not one")
    if NEEDS_TRAINING in needs:
        given = [src.get(k) if isinstance(src, dict) else getattr(src, k, None)
                 for src in (ctx.training, p.config) for k in ("epochs", "steps")]
        if not any(v is not None for v in given):
            raise SlimcError(f"pass '{p.name}' trains the model: give its length with --epochs N or --steps N "
                             f"({p.name}.epochs / {p.name}.steps in the recipe)")
    if NEEDS_CALIBRATION in needs:
        cal = ctx.calibration
        if isinstance(cal, CalibrationSource) and cal.needs_tokenizer and model.tokenizer is None:
            raise SlimcError(
                f"pass '{p.name}' calibrates on text ('{cal.name}'), which needs the model's tokenizer and this model has "
                "none: give --tokenizer DIR (or tokenizer= in slimc.load), or calibrate on token ids "
                "(--calib ids.pt | ids.npy | ids.jsonl with an 'input_ids' field)"
            )


def check_order(passes: list[Pass]) -> None:
    """Raise SlimcError when a pass of an earlier stage comes after one of a later stage (STAGES)."""
    last: tuple[int, str] | None = None
    for p in passes:
        if p.stage is None:
            continue
        rank = STAGES.index(p.stage)
        if last is not None and rank < last[0]:
            raise SlimcError(f"pass '{p.name}' ({p.stage}) cannot run after '{last[1]}' ({STAGES[last[0]]}): {STAGE_RULE}")
        last = (rank, p.name)


class PassManager:
    """Runs passes in order, recording each one's stats and time in `model.history`."""

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    def check(self, model: Model, ctx: PassContext) -> None:
        """Refuse, before anything runs, passes that cannot work here or come in the wrong order."""
        check_order(self.passes)
        for p in self.passes:
            check_needs(p, model, ctx)

    def run(self, model: Model, ctx: PassContext | None = None) -> Model:
        ctx = ctx or PassContext()
        self.check(model, ctx)
        model.place(ctx.device, ctx.dtype)
        instruments = list(ctx.instruments)
        if ctx.check_passes:
            from slimc.compiler.pipeline.instruments import OutputProbe

            instruments.append(OutputProbe())
        done: list[str] = []
        for p in self.passes:
            for inst in instruments:
                inst("start", p.name, model)
            t0 = time.perf_counter()
            try:
                result = p(model, ctx)
                model = result.model
                model.history.append(PassRecord(p.name, result.modified, time.perf_counter() - t0, dict(result.stats)))
                for inst in instruments:
                    inst("end", p.name, model)
            except Exception as e:  # noqa: BLE001 — re-raised with the pipeline's context
                raise PipelineError(p.name, done, e) from e
            done.append(p.name)
        return model
