"""The shared training loop: real digits data, deterministic and resumable training, hooks, schedules, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimc.compiler.training import TrainConfig, Trainer, accuracy_on, classification_loss, digits, lm_loss, lm_windows, npz_dataset
from slimc.errors import SlimcError

from digits_models import plain_cnn, residual_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def test_digits_split_is_fixed_and_stratified():
    train, test = digits("train"), digits("test")
    assert len(train) == 1257 and len(test) == 540
    x, y = train.tensors
    assert x.shape == (1257, 1, 8, 8) and x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    counts = torch.bincount(test.tensors[1], minlength=10).float()
    assert float(counts.min()) >= 50 and float(counts.max()) <= 56  # 30% of each class's ~180 images
    assert torch.equal(digits("test").tensors[0], test.tensors[0])
    with pytest.raises(SlimcError, match="splits"):
        digits("validation")


@pytest.mark.parametrize("build", [plain_cnn, residual_cnn])
def test_a_few_epochs_on_digits_learn_it(build):
    net = build()
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=64, progress=False)
    history = Trainer(net, digits("train"), classification_loss, cfg, evaluate=accuracy_on(digits("test"))).fit()
    assert history[-1]["step"] == 4 * 20 and history[-1]["accuracy"] > 0.9, history[-1]
    assert history[-1]["loss"] < history[0]["loss"]


def test_training_is_deterministic():
    runs = []
    for _ in range(2):
        net = plain_cnn()
        Trainer(net, digits("train"), classification_loss, TrainConfig(steps=12, lr=1e-3, progress=False)).fit()
        runs.append(params(net))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    full = plain_cnn()
    Trainer(full, digits("train"), classification_loss, TrainConfig(steps=30, lr=1e-3, progress=False)).fit()

    ckpt = tmp_path / "ckpt" / "train.pt"
    first = plain_cnn()
    # the same run stopped after 17 of its 30 steps (mid-epoch: 20 batches per epoch)
    trainer = Trainer(first, digits("train"), classification_loss,
                      TrainConfig(steps=30, lr=1e-3, progress=False, checkpoint=str(ckpt), checkpoint_every=17))

    def crash(t):  # killed during step 18, after the checkpoint of step 17 was written
        if t.step == 18:
            raise KeyboardInterrupt

    trainer.hooks.append(crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    resumed = plain_cnn(seed=5)  # other initial weights: everything must come from the checkpoint
    history = Trainer(resumed, digits("train"), classification_loss,
                      TrainConfig(steps=30, lr=1e-3, progress=False, checkpoint=str(ckpt), checkpoint_every=17)).fit()
    assert [h["step"] for h in history] == list(range(1, 31))
    assert all(torch.equal(a, b) for a, b in zip(params(full), params(resumed)))
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["train.pt"]  # no temporary files


def test_hooks_run_after_every_step_and_see_the_trainer():
    seen = []
    Trainer(plain_cnn(), digits("train"), classification_loss, TrainConfig(steps=5, progress=False),
            hooks=[lambda t: seen.append((t.step, t.optimizer.param_groups[0]["lr"]))]).fit()
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5]


def test_schedules_and_warmup():
    cfg = TrainConfig(steps=10, lr=1.0, schedule="cosine", warmup_steps=2, optimizer="sgd", progress=False)
    t = Trainer(plain_cnn(), digits("train"), classification_loss, cfg)
    lrs = [t._lr_factor(s) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.05
    lin = Trainer(plain_cnn(), digits("train"), classification_loss, TrainConfig(steps=10, schedule="linear", progress=False))
    assert lin._lr_factor(5) == pytest.approx(0.5)


@pytest.mark.parametrize("bad,match", [
    (dict(), "epochs or steps"), (dict(steps=0), "steps must be"), (dict(steps=3, optimizer="lion"), "unknown optimizer"),
    (dict(steps=3, schedule="step"), "schedule"), (dict(steps=3, lr=0.0), "lr > 0"),
])
def test_bad_training_options_are_one_error(bad, match):
    with pytest.raises(SlimcError, match=match):
        Trainer(plain_cnn(), digits("train"), classification_loss, TrainConfig(progress=False, **bad))


def test_a_diverging_loss_stops_with_an_error():
    def nan_loss(model, batch):
        return classification_loss(model, batch) * float("nan")

    with pytest.raises(SlimcError, match="diverged at step 1"):
        Trainer(plain_cnn(), digits("train"), nan_loss, TrainConfig(steps=3, progress=False)).fit()


def test_a_damaged_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "train.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(SlimcError, match="cannot resume"):
        Trainer(plain_cnn(), digits("train"), classification_loss,
                TrainConfig(steps=2, progress=False, checkpoint=str(ckpt))).fit()


def test_npz_training_data(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.random.rand(10, 1, 8, 8), labels=np.arange(10) % 3)
    ds = npz_dataset(tmp_path / "d.npz")
    assert ds.tensors[0].dtype == torch.float32 and ds.tensors[1].dtype == torch.int64 and len(ds) == 10
    np.savez(tmp_path / "bad.npz", inputs=np.zeros((3, 2)), labels=np.zeros(4))
    with pytest.raises(SlimcError, match="3 inputs but 4 labels"):
        npz_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "names.npz", a=np.zeros(2))
    with pytest.raises(SlimcError, match="expected arrays 'inputs' and 'labels'"):
        npz_dataset(tmp_path / "names.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(SlimcError, match="not a readable .npz"):
        npz_dataset(tmp_path / "junk.npz")
    np.save(tmp_path / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    import zipfile

    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as z:
        z.write(tmp_path / "obj.npy", "inputs.npy")
        z.write(tmp_path / "obj.npy", "labels.npy")
    with pytest.raises(SlimcError, match="not a readable .npz"):
        npz_dataset(tmp_path / "pickled.npz")


def test_language_model_windows_train():
    import tempfile

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tiny_tokenizer import save_tiny_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(d, 128))
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg)
    windows = lm_windows(tok, 16, 32, seed=0)
    assert windows.tensors[0].shape == (16, 32)
    history = Trainer(lm, windows, lm_loss, TrainConfig(steps=8, batch_size=4, lr=3e-3, progress=False)).fit()
    assert history[-1]["loss"] < history[0]["loss"]
