"""HESSO on the digits CNNs, side by side with Torch-Pruning + fine-tuning: the table and plot for BENCHMARKS.md.

Protocol: scikit-learn's digits, the fixed stratified 70/30 split (random_state=0; 1257 train, 540
test images); the plain and the residual BN CNN of `benchmarks/digits_models.py`; one CPU thread.

- **ours**: the shipped `hesso` pass from scratch (random init), `epochs` epochs, AdamW, cosine
  schedule, to a MAC budget (`sparsity` = 1 - the MACs kept), then the zeroed channels removed;
- **Torch-Pruning + FT** (the anchor, torch-pruning 1.6.1, pinned in the `anchors` extra): the same
  network trained dense for `epochs` epochs, pruned by Torch-Pruning's global L2 group magnitude
  (`MetaPruner`, classifier ignored, pruned in small steps until the MACs kept reach the target),
  then fine-tuned `finetune` epochs with the same trainer;
- **dense**: the `epochs`-epoch dense training both start from.

MACs are slimc's IR count for one 8x8 image (`compiler.analysis.costs.graph_macs`) for every row,
Torch-Pruning's models included. Accuracy is test accuracy, mean (and min-max) over `seeds` seeds.
OTO's reference HESSO cannot be run here (only_train_once 3.0.1 fails at import on torch >= 2.9);
its published-protocol numbers for comparable networks are quoted in the plot as points.

The cost line: HESSO's hook (selection, ramp, zeroing) against the base optimizer's step and
against the whole training step, timed over the same 300 steps.

    python benchmarks/hesso_digits.py                       # 3 seeds, 60 epochs, MACs kept 15% / 3% / 1%
    python benchmarks/hesso_digits.py --seeds 1 --keep 0.5 0.15 --out /tmp/hesso
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slimc import api
from slimc.compiler.analysis.costs import CostModel, graph_macs
from slimc.compiler.analysis.coupling import find_groups, model_graph
from slimc.compiler.model import Model
from slimc.compiler.training import TrainConfig, Trainer, accuracy_on, classification_loss, digits
from slimc.passes.hesso import Hesso, candidate_groups

from digits_models import plain_cnn, residual_cnn

MODELS = {"plain": plain_cnn, "residual": residual_cnn}
# OTO reference HESSO (only_train_once 3.0.1, 60 epochs from scratch, means of 3 seeds) on comparable BN CNNs with this split
OTO = {"plain": [(0.22, 0.9926), (0.12, 0.9932), (0.021, 0.928), (0.017, 0.901)],
       "residual": [(0.148, 0.9969), (0.029, 0.9747), (0.006, 0.913)]}
EXAMPLE = {"x": torch.zeros(1, 1, 8, 8)}


def macs_of(net: torch.nn.Module) -> int:
    return graph_macs(model_graph(Model(module=net, example_inputs=EXAMPLE)))


def train(net, epochs: int, seed: int, lr: float) -> float:
    Trainer(net, digits("train"), classification_loss,
            TrainConfig(epochs=epochs, lr=lr, optimizer="adamw", weight_decay=5e-4, seed=seed, progress=False)).fit()
    return accuracy_on(digits("test"))(net)["accuracy"]


def run_ours(name: str, keep: float, seed: int, epochs: int, overrides: list[str]) -> dict:
    net = MODELS[name](seed)
    dense_macs = macs_of(net)
    t0 = time.perf_counter()
    out = api.compress(Model(module=net, example_inputs=EXAMPLE), "hesso-70", data="digits", epochs=epochs, seed=seed,
                       overrides=[f"hesso.sparsity={1 - keep}", *overrides])
    st = out.history[-1].stats
    return {"macs_kept": macs_of(out.module) / dense_macs, "accuracy": st["accuracy_after"],
            "accuracy_trained": st["accuracy_trained"], "params": out.num_parameters(), "seconds": time.perf_counter() - t0}


def run_torch_pruning(name: str, keep: float, seed: int, dense: torch.nn.Module, finetune: int, lr: float) -> dict:
    import copy

    import torch_pruning as tp

    net = copy.deepcopy(dense)
    x = EXAMPLE["x"]
    base = macs_of(net)
    pruner = tp.pruner.MetaPruner(net, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.995,
                                  iterative_steps=400, global_pruning=True, ignored_layers=[net.head])
    net.eval()
    tp_base = tp.utils.count_ops_and_params(net, x)[0]
    for _ in range(400):  # Torch-Pruning's own MAC count steers the loop (fast); slimc's is reported
        if tp.utils.count_ops_and_params(net, x)[0] <= keep * tp_base:
            break
        pruner.step()
    no_ft = accuracy_on(digits("test"))(net)["accuracy"]
    acc = train(net, finetune, seed, lr)
    return {"macs_kept": macs_of(net) / base, "accuracy": acc, "accuracy_no_finetune": no_ft,
            "params": sum(p.numel() for p in net.parameters())}


def overhead(steps: int = 300) -> dict:
    """Seconds per step of the base AdamW training and of the same with HESSO's hook, and the hook alone."""
    rows = {}
    for with_hesso in (False, True):
        net = plain_cnn(0)
        model = Model(module=net, example_inputs=EXAMPLE)
        graph = model_graph(model)
        groups = candidate_groups(find_groups(graph, net), None)
        costs = CostModel(graph, groups, "macs")
        hooks = [Hesso(net, groups, costs, 0.15 * costs.total, periods=10, period_steps=steps // 20, start_step=steps // 10)] \
            if with_hesso else []
        trainer = Trainer(net, digits("train"), classification_loss, TrainConfig(steps=steps, lr=3e-3, progress=False), hooks=hooks)
        opt_seconds = [0.0]
        step_fn = trainer.optimizer.step

        def timed_step(*a, **k):
            t = time.perf_counter()
            out = step_fn(*a, **k)
            opt_seconds[0] += time.perf_counter() - t
            return out

        trainer.optimizer.step = timed_step
        t0 = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - t0
        rows["hesso" if with_hesso else "base"] = {"step": total / steps, "optimizer_step": opt_seconds[0] / steps,
                                                   "hook": (hooks[0].seconds / steps) if hooks else 0.0}
    b, h = rows["base"], rows["hesso"]
    rows["hook_over_optimizer_step"] = h["hook"] / b["optimizer_step"]
    rows["training_step_ratio"] = h["step"] / b["step"]
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["model"] for r in results["rows"]})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, style in (("ours (HESSO)", "o-"), ("Torch-Pruning + FT", "s--")):
            pts = sorted((r["macs_kept"], r["accuracy"]) for r in results["rows"] if r["model"] == name and r["method"] == method)
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] * 100 for p in pts], style, label=method)
        oto = OTO.get(name, [])
        ax.plot([p[0] * 100 for p in oto], [p[1] * 100 for p in oto], "k^", label="OTO HESSO (published)")
        dense = [r["accuracy"] for r in results["rows"] if r["model"] == name and r["method"] == "dense"]
        if dense:
            ax.axhline(dense[0] * 100, color="grey", linestyle=":", label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("MACs kept (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"digits, {name} CNN")
        ax.set_ylim(80, 100.2)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--keep", nargs="+", type=float, default=[0.15, 0.03, 0.01], help="MACs kept")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--finetune", type=int, default=20, help="Torch-Pruning's fine-tuning epochs")
    ap.add_argument("--lr", type=float, default=3e-3, help="dense training and fine-tuning learning rate")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="hesso.key=value overrides for ours")
    ap.add_argument("--no-anchor", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--out", type=Path, default=Path("hesso_digits"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        per: dict[tuple[str, float], list[dict]] = {}
        dense_acc = []
        for seed in range(args.seeds):
            dense = MODELS[name](seed)
            dense_acc.append(train(dense, args.epochs, seed, args.lr))
            for keep in args.keep:
                per.setdefault(("ours (HESSO)", keep), []).append(run_ours(name, keep, seed, args.epochs, args.overrides))
                if not args.no_anchor:
                    per.setdefault(("Torch-Pruning + FT", keep), []).append(
                        run_torch_pruning(name, keep, seed, dense, args.finetune, args.lr))
            print(f"{name} seed {seed} done", flush=True)
        rows.append({"model": name, "method": "dense", "target": 1.0, "macs_kept": 1.0, "accuracy": statistics.mean(dense_acc),
                     "accuracy_min": min(dense_acc), "accuracy_max": max(dense_acc), "seeds": len(dense_acc)})
        for (method, keep), runs in per.items():
            accs = [r["accuracy"] for r in runs]
            rows.append({"model": name, "method": method, "target": keep, "macs_kept": statistics.mean(r["macs_kept"] for r in runs),
                         "accuracy": statistics.mean(accs), "accuracy_min": min(accs), "accuracy_max": max(accs),
                         "params": statistics.mean(r["params"] for r in runs), "seeds": len(runs),
                         **({"accuracy_no_finetune": statistics.mean(r["accuracy_no_finetune"] for r in runs)}
                            if "accuracy_no_finetune" in runs[0] else {})})
    cost = overhead()
    results = {"epochs": args.epochs, "finetune": args.finetune, "seeds": args.seeds, "overrides": args.overrides,
               "rows": rows, "overhead": cost, "oto_published": OTO}
    (args.out / "hesso_digits.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "hesso_digits.png")
    print(f"\n| model | method | MAC target kept | MACs kept | test accuracy (mean, min-max over {args.seeds} seeds) | params |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        extra = f" (no FT: {r['accuracy_no_finetune']:.2%})" if "accuracy_no_finetune" in r else ""
        print(f"| {r['model']} | {r['method']} | {r['target']:.0%} | {r['macs_kept']:.2%} | "
              f"{r['accuracy']:.2%} ({r['accuracy_min']:.2%}-{r['accuracy_max']:.2%}){extra} | {int(r.get('params', 0)) or ''} |")
    print(f"\nHESSO cost: hook {cost['hesso']['hook'] * 1e3:.3f} ms/step = {cost['hook_over_optimizer_step']:.1%} of the base "
          f"optimizer step ({cost['base']['optimizer_step'] * 1e3:.3f} ms); whole training step x{cost['training_step_ratio']:.3f}")
    print(f"wrote {args.out}/hesso_digits.json and .png")


if __name__ == "__main__":
    main()
