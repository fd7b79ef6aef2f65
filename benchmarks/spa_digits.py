"""SPA / OBSPA on the digits CNNs without fine-tuning, side by side with Torch-Pruning: the table for BENCHMARKS.md.

Protocol: scikit-learn's digits, the fixed stratified 70/30 split (random_state=0); the plain and residual BN
CNNs of `benchmarks/digits_models.py`, trained dense 60 epochs (AdamW lr 3e-3, weight decay 5e-4, cosine) per
seed; then, on a copy of the same trained network, each method removes `remove` of the MACs (slimc's IR count
for one 8x8 image) with **no fine-tuning**:

- ours: `spa-l2-50` (global L2), `spa-taylor-50` (global |w g| on 512 training images), `obspa-50` (data-free:
  inputs synthesised from the BN statistics, greedy OBS ranking, layer refit), `obspa-calib-50` (the same with
  512 training images), each with `--set spa.sparsity=<remove> spa.round_to=1` (these layers are 32-64 wide);
  `obspa-bn` is the analytic BN-statistics H (`spa.hessian=bn`, one-shot OBS update, no refit): the data-free H
  measured against the calibration one;
- Torch-Pruning 1.6.1 (`anchors` extra): `MetaPruner` with L2 magnitude or Taylor importance, local or global,
  classifier ignored, pruned in small steps until its MAC count reaches the target; also after re-estimating the
  BN statistics on the training images (no gradient step);
- `--finetune N` adds, at `--ft-keep` of the MACs kept, both methods followed by N epochs of fine-tuning with
  the same trainer (ours: `obspa-calib`, Torch-Pruning: its best no-FT row's settings).

Accuracy: test accuracy, mean (min-max) over `seeds`.

    python benchmarks/spa_digits.py                      # 3 seeds, 50% and 75% of the MACs removed
    python benchmarks/spa_digits.py --seeds 1 --remove 0.5 --models plain --finetune 20 --ft-keep 0.03
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from slimc import api
from slimc.compiler.analysis.costs import graph_macs
from slimc.compiler.analysis.coupling import model_graph
from slimc.compiler.model import Model
from slimc.compiler.training import TrainConfig, Trainer, accuracy_on, classification_loss, digits

from digits_models import plain_cnn, residual_cnn

MODELS = {"plain": plain_cnn, "residual": residual_cnn}
EXAMPLE = {"x": torch.zeros(1, 1, 8, 8)}
OURS = {
    "spa-l2": ("spa-l2-50", []),
    "spa-taylor": ("spa-taylor-50", ["spa.samples=512"]),
    "obspa-bn (analytic H, no refit)": ("obspa-50", ["spa.hessian=bn", "spa.reconstruct=none"]),
    "obspa (data-free)": ("obspa-50", []),
    "obspa-calib": ("obspa-calib-50", ["spa.samples=512"]),
}


def macs_of(net) -> int:
    return graph_macs(model_graph(Model(module=net, example_inputs=EXAMPLE)))


def test_acc(net) -> float:
    return accuracy_on(digits("test"))(net)["accuracy"]


def train(net, epochs, seed, lr=3e-3):
    Trainer(net, digits("train"), classification_loss,
            TrainConfig(epochs=epochs, lr=lr, weight_decay=5e-4, seed=seed, progress=False)).fit()
    return net.eval()


def ours(net, recipe, extra, remove):
    t0 = time.perf_counter()
    out = api.compress(Model(module=copy.deepcopy(net), example_inputs=EXAMPLE), recipe, data="digits",
                       overrides=[f"spa.sparsity={remove}", "spa.round_to=1", *extra])
    return out.module, {"seconds": time.perf_counter() - t0}


def bn_recalibrate(net, n=1257):
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the passes below
    net.train()
    x = digits("train").tensors[0][:n]
    with torch.no_grad():
        for i in range(0, len(x), 128):
            net(x[i:i + 128])
    return net.eval()


def torch_pruning(net, importance, global_pruning, remove):
    import torch_pruning as tp

    net = copy.deepcopy(net).eval()
    x = EXAMPLE["x"]
    imp = tp.importance.GroupMagnitudeImportance(p=2) if importance == "l2" else tp.importance.GroupTaylorImportance()
    pruner = tp.pruner.MetaPruner(net, x, importance=imp, pruning_ratio=0.99, iterative_steps=400,
                                  global_pruning=global_pruning, ignored_layers=[net.head])
    base = tp.utils.count_ops_and_params(net, x)[0]
    data = digits("train").tensors
    for _ in range(400):
        if tp.utils.count_ops_and_params(net, x)[0] <= (1 - remove) * base:
            break
        if importance == "taylor":
            net.zero_grad()
            classification_loss(net, (data[0][:512], data[1][:512])).backward()
        pruner.step()
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--remove", nargs="+", type=float, default=[0.5, 0.75], help="fraction of the MACs removed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--finetune", type=int, default=0, help="fine-tuning epochs for the --ft-keep comparison (0: skip)")
    ap.add_argument("--ft-keep", type=float, default=0.03, help="MACs kept in the fine-tuning comparison")
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("spa_digits.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: dict[tuple, list[dict]] = {}

    def add(model, method, remove, net, dense_macs, **extra):
        rows.setdefault((model, method, remove), []).append({"macs_kept": macs_of(net) / dense_macs, "accuracy": test_acc(net), **extra})

    for name in args.models:
        for seed in range(args.seeds):
            dense = train(MODELS[name](seed), args.epochs, seed)
            base = macs_of(dense)
            add(name, "dense", 0.0, dense, base)
            for remove in args.remove:
                for method, (recipe, extra) in OURS.items():
                    net, info = ours(dense, recipe, extra, remove)
                    add(name, f"ours: {method}", remove, net, base, **info)
                if not args.no_anchor:
                    for imp in ("l2", "taylor"):
                        for glob in (False, True):
                            net = torch_pruning(dense, imp, glob, remove)
                            label = f"Torch-Pruning {imp} {'global' if glob else 'local'}"
                            add(name, label, remove, net, base)
                            add(name, label + " + BN re-estimation", remove, bn_recalibrate(net), base)
            if args.finetune:
                remove = 1 - args.ft_keep
                net, _ = ours(dense, "obspa-calib-50", ["spa.samples=512"], remove)
                add(name, f"ours: obspa-calib + {args.finetune} epochs FT", remove, train(net, args.finetune, seed), base)
                if not args.no_anchor:
                    net = torch_pruning(dense, "l2", True, remove)
                    add(name, f"Torch-Pruning l2 global + {args.finetune} epochs FT", remove, train(net, args.finetune, seed), base)
            print(f"{name} seed {seed} done", flush=True)
    table = []
    for (model, method, remove), runs in rows.items():
        accs = [r["accuracy"] for r in runs]
        table.append({"model": model, "method": method, "remove": remove, "macs_kept": statistics.mean(r["macs_kept"] for r in runs),
                      "accuracy": statistics.mean(accs), "min": min(accs), "max": max(accs), "seeds": len(runs),
                      **({"seconds": statistics.mean(r["seconds"] for r in runs)} if "seconds" in runs[0] else {})})
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": table}, indent=2) + "\n")
    print(f"\n| model | method | MACs removed (target) | MACs kept | test accuracy, mean (min-max), {args.seeds} seeds | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table:
        secs = f"{r['seconds']:.1f}" if "seconds" in r else ""
        print(f"| {r['model']} | {r['method']} | {r['remove']:.0%} | {r['macs_kept']:.1%} | {r['accuracy']:.2%} "
              f"({r['min']:.2%}-{r['max']:.2%}) | {secs} |")


if __name__ == "__main__":
    main()
