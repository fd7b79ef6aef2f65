"""Training: the one loop every training pass shares (HESSO, fine-tuning after pruning, healing), and its data.

    from slimc.compiler.training import Trainer, TrainConfig, digits
    train, test = digits("train"), digits("test")
    trainer = Trainer(net, train, classification_loss, TrainConfig(epochs=5, lr=1e-3), evaluate=accuracy_on(test))
    history = trainer.fit()

`data` holds the built-in sources (`digits`, pydoc token windows) and user files (`.npz`); `trainer`
the loop: seeded and deterministic on CPU, resumable from an atomically written checkpoint, with
hooks after every optimizer step (where a structured-sparsity optimizer projects its groups).
"""

from slimc.compiler.training.data import digits, lm_windows, npz_dataset
from slimc.compiler.training.trainer import TrainConfig, Trainer, accuracy_on, classification_loss, lm_loss

__all__ = ["Trainer", "TrainConfig", "digits", "lm_windows", "npz_dataset", "accuracy_on", "classification_loss", "lm_loss"]
