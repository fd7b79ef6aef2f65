"""`Trainer`: one small training loop, deterministic on CPU and resumable, shared by every training pass.

    trainer = Trainer(net, dataset, classification_loss, TrainConfig(epochs=20, lr=1e-3),
                      evaluate=accuracy_on(test_set), hooks=[project_groups])
    history = trainer.fit()                  # [{"step", "epoch", "loss", "lr", ...evaluation}]

- data: a map-style `Dataset` (batched here: each epoch's order is a permutation drawn from
  `seed` and the epoch, so a resumed run sees exactly the batches the uninterrupted one would), or
  any `DataLoader` (its own order; on resume the finished batches of the epoch are skipped);
- `loss_fn(model, batch) -> scalar` (`classification_loss`, `lm_loss`, or the user's own);
- optimizer `sgd` / `adam` / `adamw` (or a ready torch optimizer), learning-rate schedule `constant`
  / `cosine` / `linear` with warm-up, epochs or steps, gradient clipping;
- `hooks`: called after every optimizer step with the trainer (`trainer.step`, `.model`,
  `.optimizer`): a structured-sparsity optimizer (HESSO) scales and zeroes its groups there;
- `evaluate(model) -> dict` every `eval_every` steps and at the end;
- `checkpoint`: a path; the model, optimizer, schedule, step, RNG state and history are written
  there atomically (temporary file + rename) every `checkpoint_every` steps, and `fit` resumes from
  it when it exists.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimc.errors import SlimcError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    epochs: int | None = None
    steps: int | None = None  # total optimizer steps; with epochs too, whichever ends first
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None
    eval_every: int | None = None  # steps; None: only at the end
    seed: int = 0
    checkpoint: str | None = None
    checkpoint_every: int = 100
    progress: bool = True

    def check(self) -> None:
        if self.epochs is None and self.steps is None:
            raise SlimcError("training needs a length: give epochs or steps")
        for name in ("epochs", "steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise SlimcError(f"training {name} must be >= 1 (got {v})")
        if self.batch_size < 1 or not self.lr > 0 or self.warmup_steps < 0 or self.checkpoint_every < 1:
            raise SlimcError("training needs batch_size >= 1, lr > 0, warmup_steps >= 0 and checkpoint_every >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise SlimcError(f"unknown optimizer '{self.optimizer}'; choose {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise SlimcError(f"unknown learning-rate schedule '{self.schedule}'; choose {', '.join(SCHEDULES)}")


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cross-entropy of `model(inputs)` against integer labels; batch = (inputs, labels)."""
    x, y = batch[0], batch[1]
    return nn.functional.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on token windows; batch = (ids,)."""
    ids = batch[0]
    logits = model(input_ids=ids, use_cache=False).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def accuracy_on(dataset: Dataset, batch_size: int = 512) -> Callable[[nn.Module], dict[str, float]]:
    """An `evaluate` function: top-1 accuracy of a classifier on `dataset` (eval mode, no gradients)."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in DataLoader(dataset, batch_size=batch_size):
                correct += int((model(x).argmax(-1) == y).sum())
                total += int(y.numel())
        model.train(was)
        return {"accuracy": correct / max(total, 1)}

    return evaluate


def collate(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Examples of a map-style dataset (tuples of tensors) stacked into one batch tuple."""
    return tuple(torch.stack([item[k] for item in items]) for k in range(len(items[0])))


class Trainer:
    def __init__(self, model: nn.Module, data: Dataset | DataLoader, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 config: TrainConfig, *, evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 optimizer: torch.optim.Optimizer | None = None, hooks: Iterable[Callable[["Trainer"], None]] = ()):
        config.check()
        self.model, self.data, self.loss_fn, self.config = model, data, loss_fn, config
        self.evaluate, self.hooks = evaluate, list(hooks)
        torch.manual_seed(config.seed)
        self.optimizer = optimizer if optimizer is not None else self._optimizer()
        self.batches_per_epoch = self._batches_per_epoch()
        self.total_steps = self._total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------ set-up

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg, params = self.config, [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise SlimcError("the model has no trainable parameters")
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _batches_per_epoch(self) -> int:
        if isinstance(self.data, DataLoader):
            return len(self.data)
        n = len(self.data)
        if n == 0:
            raise SlimcError("the training data is empty")
        return math.ceil(n / self.config.batch_size)

    def _total_steps(self) -> int:
        cfg = self.config
        by_epochs = cfg.epochs * self.batches_per_epoch if cfg.epochs is not None else None
        return min(s for s in (by_epochs, cfg.steps) if s is not None)

    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, self.total_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if cfg.schedule == "linear":
            return 1.0 - t
        return 1.0

    def _epoch_batches(self, epoch: int) -> Iterator[Any]:
        """The batches of `epoch`, in an order fixed by (seed, epoch)."""
        if isinstance(self.data, DataLoader):
            yield from self.data
            return
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data), generator=g)
        for idx in order.split(self.config.batch_size):
            yield collate([self.data[int(i)] for i in idx])

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "rng": torch.get_rng_state(),
                "history": self.history, "config": asdict(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])
        self.history = list(state["history"])

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the trainer's state to `path` atomically: a crash leaves the previous checkpoint or none."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _resume(self) -> None:
        path = self.config.checkpoint
        if path is None or not Path(path).is_file():
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 — a checkpoint of another model or a damaged file
            raise SlimcError(f"{path}: cannot resume from this training checkpoint ({type(e).__name__}); "
                             "delete it to start over") from None

    # ------------------------------------------------------------ the loop

    def _record(self, row: dict[str, Any], final: bool = False) -> None:
        cfg = self.config
        if self.evaluate is not None and (final or (cfg.eval_every and self.step % cfg.eval_every == 0)):
            row.update(self.evaluate(self.model))
        self.history.append(row)

    def fit(self) -> list[dict[str, Any]]:
        """Train to the configured length (resuming from the checkpoint when there is one); the history."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        cfg = self.config
        self._resume()
        self.model.train()
        console = Console(stderr=True)
        progress = Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.fields[loss]}"),
                            TimeRemainingColumn(), console=console, transient=True,
                            disable=not (cfg.progress and console.is_terminal))
        with progress:
            task = progress.add_task("train", total=self.total_steps, completed=self.step, loss="")
            while self.step < self.total_steps:
                epoch, skip = divmod(self.step, self.batches_per_epoch)
                for i, batch in enumerate(self._epoch_batches(epoch)):
                    if i < skip:
                        continue
                    loss = self._train_step(batch)
                    self._record({"step": self.step, "epoch": epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[0]},
                                 final=self.step == self.total_steps)
                    progress.update(task, completed=self.step, loss=f"loss {loss:.4f}")
                    if cfg.checkpoint is not None and (self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps):
                        self.save_checkpoint(cfg.checkpoint)
                    if self.step >= self.total_steps:
                        break
        self.model.eval()
        return self.history

    def _train_step(self, batch: Any) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, batch)
        if not torch.isfinite(loss):
            raise SlimcError(f"training diverged at step {self.step + 1}: the loss is {float(loss)}; lower the learning rate")
        loss.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        for hook in self.hooks:
            hook(self)
        return float(loss.detach())
