"""Pass infrastructure: `Pass`, `PassResult`, `PassContext`, `PassManager`, and the registry.

A pass is a small object with a typed, validated config (a pydantic model; unknown keys are
errors). `Pass.__call__` checks preconditions (`requires`), runs `call`, then checks
postconditions (`ensures`) — passes do not repeat those checks themselves. The manager times
each pass, records it in the model's history, and on failure raises `PipelineError` naming the
failing pass and those before it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from .errors import PipelineError, SlimcError
from .model import Model, PassRecord


class PassConfig(BaseModel):
    """Base of every pass's options: strict (unknown keys are errors), serialisable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class PassResult:
    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the model: calibration data, device, dtype, seed, instruments."""

    calibration: Any = None  # a calibration source (compiler.calibration), or None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    seed: int = 0
    verify: bool = True  # run the passes' postcondition checks
    instruments: list[Callable[[str, str, Model], None]] = field(default_factory=list)
    progress: Any = None  # rich Progress, when the CLI shows one

    def notify(self, event: str, pass_name: str, model: Model) -> None:
        for inst in self.instruments:
            inst(event, pass_name, model)


class Pass(ABC):
    """One transformation. Subclasses set `name`, `Config`, `description` and implement `call`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[PassConfig]] = PassConfig

    def __init__(self, config: PassConfig | dict | None = None, **options: Any):
        if config is None:
            config = self.Config(**options)
        elif isinstance(config, dict):
            config = self.Config(**{**config, **options})
        self.config = config

    def requires(self, model: Model, ctx: PassContext) -> None:
        """Raise SlimcError if the pass cannot run on this model."""

    def ensures(self, model: Model, ctx: PassContext) -> None:
        """Raise if the result breaks the pass's postcondition (runs when ctx.verify)."""

    @abstractmethod
    def call(self, model: Model, ctx: PassContext) -> PassResult: ...

    def __call__(self, model: Model, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
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
    PASSES[name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    from .. import passes as _  # noqa: F401  (registers the shipped passes)

    try:
        return PASSES[name]
    except KeyError:
        raise SlimcError(f"unknown pass '{name}'; known passes: {', '.join(sorted(PASSES))}") from None


class PassManager:
    """Runs passes in order, recording each one's stats and time in `model.history`."""

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    def run(self, model: Model, ctx: PassContext | None = None) -> Model:
        ctx = ctx or PassContext()
        done: list[str] = []
        for p in self.passes:
            ctx.notify("start", p.name, model)
            t0 = time.perf_counter()
            try:
                result = p(model, ctx)
            except Exception as e:  # noqa: BLE001 — re-raised with the pipeline's context
                raise PipelineError(p.name, done, e) from e
            dt = time.perf_counter() - t0
            model = result.model
            model.history.append(PassRecord(p.name, result.modified, dt, dict(result.stats)))
            ctx.notify("end", p.name, model)
            done.append(p.name)
        return model
