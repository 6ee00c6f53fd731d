"""XNOR-Net weights on digits: an MLP whose hidden kernels are 1 bit, trained straight-through.

A Flax linen MLP (64-256-256-10) on scikit-learn's bundled digits (1797 real 8x8 images,
stratified 75/25 split, seed 0). The float32 baseline is trained with Adam; the binarized
models keep float "latent" weights, and every forward pass uses
`quantizers.binarize(kernel) = sign(kernel) * mean(|kernel|)` for the hidden layers' kernels (the
10-way classifier and the biases stay float, as in XNOR-Net). The gradient reaches the
latent weights through the straight-through estimator: identity (`quantizers.binarize`), or
zeroed where |w| > 1 (`clip=True`). Also shown: binarizing the trained float model with
no straight-through training. Writes `results.md`, `accuracy.png` and `weights.png`.

    python examples/xnor.py              # defaults: about half a minute on 2 CPU cores
    python examples/xnor.py --epochs 2   # a smoke run
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _digits import load_digits_split  # noqa: E402

from clusterjax import quantizers  # noqa: E402

# name: (binarize hidden kernels?, scale axis, clip, trained straight-through?)
VARIANTS = {
    "float32": (False, None, False, True),
    "float32, binarized after training": (True, None, False, False),
    "XNOR": (True, None, False, True),
    "XNOR, clipped STE": (True, None, True, True),
    "XNOR, per-channel scale": (True, 0, False, True),
}
SHORT = {"float": "float32", "post": "float32, binarized after training", "xnor": "XNOR"}
SHORT |= {"clip": "XNOR, clipped STE", "channel": "XNOR, per-channel scale"}


class MLP(nn.Module):
    """Dense + ReLU hidden layers, then a float 10-way classifier (`Dense_{len(hidden)}`)."""

    hidden: tuple[int, ...] = (256, 256)

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


def binarize_hidden(params, *, axis=None, clip=False):
    """Replaces every hidden kernel by `quantizers.binarize(kernel)`; the rest is unchanged."""
    last = f"Dense_{len(params) - 1}"

    def one(path, leaf):
        layer, name = path[0].key, path[-1].key
        return (
            quantizers.binarize(leaf, axis=axis, clip=clip)
            if name == "kernel" and layer != last
            else leaf
        )

    return jax.tree.map_with_path(one, params)


def latent_outside_unit(params) -> float:
    """The fraction of hidden-kernel weights with |w| > 1 (no gradient under `clip=True`)."""
    last = f"Dense_{len(params) - 1}"
    kernels = [np.asarray(v["kernel"]) for k, v in params.items() if k != last]
    return sum(int((np.abs(w) > 1).sum()) for w in kernels) / sum(w.size for w in kernels)


def storage_bytes(params, binarized: bool, axis) -> int:
    """Bytes to store the model: 1 bit per binarized weight plus float32 scales, else 4."""
    last = f"Dense_{len(params) - 1}"
    total = 0
    for layer, leaves in params.items():
        for name, leaf in leaves.items():
            if binarized and name == "kernel" and layer != last:
                scales = 1 if axis is None else leaf.shape[1]
                total += -(-leaf.size // 8) + 4 * scales
            else:
                total += 4 * leaf.size
    return total


def make_evaluate(model, x, y):
    """A jitted `evaluate(params, *, binarized, axis, clip) -> accuracy` on `(x, y)`."""

    @functools.partial(jax.jit, static_argnames=("binarized", "axis", "clip"))
    def evaluate(params, *, binarized: bool, axis, clip: bool):
        if binarized:
            params = binarize_hidden(params, axis=axis, clip=clip)
        logits = model.apply({"params": params}, x)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    return evaluate


def train(model, params, data, evaluate, *, binarized, axis, clip, args, desc):
    """Adam with cosine decay; returns (params, test accuracy after each epoch)."""
    x_tr, y_tr = data[0], data[1]
    steps_per_epoch = len(x_tr) // args.batch_size
    total = args.epochs * steps_per_epoch
    tx = optax.adam(optax.cosine_decay_schedule(args.lr, max(total, 1)))
    opt_state = tx.init(params)

    def effective(params):
        return binarize_hidden(params, axis=axis, clip=clip) if binarized else params

    def loss_fn(params, x, y):
        logits = model.apply({"params": effective(params)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    curve = []
    with tqdm(total=total, desc=desc, leave=False, disable=args.no_progress) as bar:
        for _ in range(args.epochs):
            order = rng.permutation(len(x_tr))
            for i in range(steps_per_epoch):
                idx = order[i * args.batch_size : (i + 1) * args.batch_size]
                params, opt_state, loss = step(params, opt_state, x_tr[idx], y_tr[idx])
                bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
            curve.append(float(evaluate(params, binarized=binarized, axis=axis, clip=clip)))
    return params, curve


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=60, help="training epochs per model (60)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam peak learning rate (1e-3)")
    p.add_argument("--hidden", default="256,256", help="hidden widths (256,256)")
    p.add_argument(
        "--variants",
        default="float,post,xnor,clip,channel",
        help="comma list of: float (baseline), post (float model binarized after\n"
        "training), xnor, clip (clipped STE), channel (per-output-channel scale)",
    )
    p.add_argument("--seed", type=int, default=0, help="init and shuffling seed (0)")
    p.add_argument("--out", default=None, help="output folder (examples/out/xnor/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in SHORT]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {sorted(SHORT)}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.abspath(args.out or os.path.join(here, "out", "xnor"))
    os.makedirs(out, exist_ok=True)
    data = load_digits_split(0)
    model = MLP(tuple(int(h) for h in args.hidden.split(",")))
    init = jax.jit(model.init)(jax.random.key(args.seed), data[0][:1])["params"]
    evaluate = make_evaluate(model, jnp.asarray(data[2]), jnp.asarray(data[3]))
    names = [SHORT[v] for v in args.variants.split(",")]
    need_float = "float32" in names or "float32, binarized after training" in names

    rows, curves, trained = [], {}, {}
    float_acc = None
    if need_float:
        t0 = time.perf_counter()
        trained["float32"], curves["float32"] = train(
            model,
            init,
            data,
            evaluate,
            binarized=False,
            axis=None,
            clip=False,
            args=args,
            desc="float32",
        )
        float_acc = float(evaluate(trained["float32"], binarized=False, axis=None, clip=False))
        float_secs = time.perf_counter() - t0
    for name in names:
        binarized, axis, clip, ste = VARIANTS[name]
        t0 = time.perf_counter()
        if name == "float32":
            params, secs = trained["float32"], float_secs
        elif not ste:  # post-training binarization of the float model, no retraining
            params, secs = trained["float32"], 0.0
        else:
            params, curves[name] = train(
                model,
                init,
                data,
                evaluate,
                binarized=True,
                axis=axis,
                clip=clip,
                args=args,
                desc=name,
            )
            trained[name] = params
            secs = time.perf_counter() - t0
        acc = float(evaluate(params, binarized=binarized, axis=axis, clip=clip))
        nbytes = storage_bytes(params, binarized, axis)
        outside = f"{100 * latent_outside_unit(params):.2f}%"
        delta = "-" if float_acc is None else f"{100 * (acc - float_acc):+.2f}"
        rows.append(
            [
                name,
                "hidden kernels" if binarized else "none",
                "-" if not binarized else ("per tensor" if axis is None else "per channel"),
                acc,
                delta,
                outside if binarized else "-",
                nbytes,
                f"{secs:.1f}",
            ]
        )

    header = ["model", "binarized", "scale", "test acc", "Δ vs float (pts)"]
    header += ["latent outside [-1, 1]", "bytes", "train s"]
    table = markdown_table(header, rows)
    seconds = time.perf_counter() - start
    text = (
        "# XNOR-Net weight binarization on digits\n\n"
        f"MLP 64-{args.hidden.replace(',', '-')}-10, digits stratified 75/25 split (seed 0; "
        f"1347 train / 450 test); {args.epochs} epochs Adam {args.lr} (cosine decay), "
        f"batch {args.batch_size}, seed {args.seed}. Binarized models: forward "
        "`sign(w) * mean(|w|)` on the hidden layers' kernels, straight-through gradient to "
        "float latent weights; classifier and biases float32. 'bytes': 1 bit per binarized "
        "weight + float32 scales, 4 bytes per other parameter. 'latent outside [-1, 1]': "
        "share of the hidden kernels' float weights with |w| > 1 after training, where the "
        "clipped estimator zeroes the gradient (when it is 0%, clipping never acted and the "
        "clipped run differs from plain XNOR only by float noise).\n\n"
        f"{table}\n\nWall time: {seconds:.0f} s.\n"
    )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    _figures(out, curves, trained, float_acc)
    print(text)
    print(f"wrote {out}/results.md, accuracy.png, weights.png")
    accs = {r[0]: r[3] for r in rows}
    return {"rows": rows, "accuracy": accs, "curves": curves, "out": out, "seconds": seconds}


def markdown_table(header, rows) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _figures(out, curves, trained, float_acc):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.8, 1.0)
    ax.set_title("digits MLP: float32 vs binarized hidden weights (XNOR, STE)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, params in trained.items():
        w = np.asarray(params["Dense_1"]["kernel"]).ravel()
        label = "float32 weights" if name == "float32" else f"{name}: latent weights"
        ax.hist(w, bins=120, histtype="step", density=True, label=label)
    ax.set_xlabel("Dense_1 kernel value")
    ax.set_ylabel("density")
    ax.set_title("hidden kernel weights after training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "weights.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
