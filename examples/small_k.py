"""Small K (2, 3, 4, 8) with tfmot's tutorial recipe: default init vs kmeans++.

The recipe of tfmot's clustering tutorial, on digits: an MLP 64-256-256-10 trained 30
epochs and a CNN (Conv 12 3x3 VALID, ReLU, 2x2 max-pool, Dense 10) trained 100 epochs,
Adam 1e-3, batch 64; then every kernel clustered, fine-tuned 3 epochs with Adam 1e-4
(constant), batch 64, and stripped. Each cell is the median (and range) over `--seeds`
clustering seeds (the cluster init key and the fine-tuning batch order); the float
models are trained once.

    python examples/small_k.py
    python examples/small_k.py --help
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

import clusterjax as cj  # noqa: E402

#: tfmot's own numbers for this recipe (tfmot 0.8.1, kmeans++ init), for the table.
TFMOT = {("mlp", 2): 0.673, ("cnn", 2): 0.400, ("cnn", 3): 0.942, ("cnn", 4): 0.960}


class TutorialCNN(nn.Module):
    """tfmot's tutorial CNN: Conv 12 3x3 VALID, ReLU, 2x2 max-pool, Dense 10."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(12, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


MODELS = {"mlp": C.MLP(), "cnn": TutorialCNN()}
EPOCHS = {"mlp": 30, "cnn": 100}


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--models", default="mlp,cnn", help="comma list of: mlp, cnn")
    p.add_argument("--clusters", default="2,3,4,8", help="comma list of K")
    p.add_argument("--inits", default="kmeans,kmeans++", help="comma list of init methods")
    p.add_argument("--seeds", type=int, default=5, help="clustering seeds per cell")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument(
        "--layers", default=C.KERNELS, help="regex of the leaves to cluster (default: all kernels)"
    )
    p.add_argument(
        "--fisher-damping",
        type=float,
        default=None,
        help="also weight the k-means by cj.fisher_importance (512 training examples) "
        "with this importance_damping; default: plain k-means only",
    )
    p.add_argument("--steps", type=int, default=None, help="cap every loop (smoke tests)")
    p.add_argument("--out", default="examples/out/small_k", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def _cell(v) -> str:
    return f"{np.median(v):.3f} ({np.min(v):.3f}-{np.max(v):.3f})"


def main(argv=None) -> dict:
    args = parse(argv)
    timer = C.Timer()
    out = C.out_dir(args.out)
    data = C.load_data()
    x_te, y_te = data[2], data[3]
    ks = [int(k) for k in args.clusters.split(",")]
    inits = args.inits.split(",")
    bar = not args.no_progress
    # acc[(model, init, k)] = (before fine-tuning, after) lists over seeds
    acc, base, tables = {}, {}, {}
    for name in args.models.split(","):
        model = MODELS[name]
        params = C.train_plain(
            model, C.init_params(model, data[0], 0), data, epochs=EPOCHS[name], lr=1e-3,
            batch_size=64, seed=0, bar=bar, max_steps=args.steps, desc=f"{name} train",
        )  # fmt: skip
        base[name] = C.accuracy(model, params, x_te, y_te)
        variants = [(init, {}) for init in inits]
        if args.fisher_damping is not None:
            imp = cj.fisher_importance(
                lambda p, b, model=model: C._xent(model.apply({"params": p}, b[0]), b[1]),
                params, [(data[0][:512], data[1][:512])], select=args.layers,
            )  # fmt: skip
            fisher = dict(importance=imp, importance_damping=args.fisher_damping)
            variants.append((f"kmeans + Fisher ({args.fisher_damping:g})", fisher))
        for init, extra in variants:
            for k in ks:
                before, after = [], []
                for seed in range(args.seeds):
                    spec = cj.ClusterSpec(num_clusters=k, init=init.split(" ")[0])
                    state = cj.init(params, {args.layers: spec}, key=jax.random.key(seed), **extra)
                    before.append(C.accuracy(model, cj.strip(params, state), x_te, y_te))
                    p2, s2 = C.train_clustered(
                        model, params, state, data, epochs=args.finetune_epochs,
                        lr=args.finetune_lr, batch_size=64, seed=seed, bar=bar,
                        max_steps=args.steps, desc=f"{name} {init} K={k} seed {seed}",
                    )  # fmt: skip
                    after.append(C.accuracy(model, cj.strip(p2, s2), x_te, y_te))
                    if seed == 0:
                        first = jax.tree.leaves(s2.centroids)[0]
                        tables[(name, init, k)] = [round(float(v), 3) for v in np.asarray(first)]
                acc[(name, init, k)] = (before, after)
    rows = []
    for name, init, k in acc:
        before, after = acc[(name, init, k)]
        tf = TFMOT.get((name, k))
        rows.append([
            name, k, init, _cell(before), _cell(after), "-" if tf is None else f"{tf:.3f}",
            "-" if tf is None else ("yes" if np.median(after) >= tf else "no"),
        ])  # fmt: skip
    header = ["model", "K", "init", "before fine-tuning", "after fine-tuning", "tfmot",
              "median >= tfmot"]  # fmt: skip
    floats = ", ".join(f"{n} {a:.3f}" for n, a in base.items())
    text = (
        f"# Small K, tfmot's recipe: digits test accuracy\n\n"
        f"Data: {C.SPLIT}. Float models (trained once, seed 0): {floats}. Leaves matching "
        f"`{args.layers}` clustered per tensor, fine-tuned {args.finetune_epochs} epochs Adam "
        f"{args.finetune_lr} (constant), batch 64, with the README train step, then "
        f"stripped. Median (min-max) over {args.seeds} clustering seeds.\n\n"
        f"{C.markdown_table(header, rows)}\n\n"
        "First clustered table after fine-tuning (seed 0): "
        + "; ".join(f"{n} {i} K={k}: {t}" for (n, i, k), t in tables.items())
        + f"\n\n{timer.report()}\n"
    )
    C.write_results(out, text)
    print(text)
    print(f"wrote {out}/results.md")
    return {"rows": rows, "acc": acc, "base": base, "out": out}


if __name__ == "__main__":
    main()
