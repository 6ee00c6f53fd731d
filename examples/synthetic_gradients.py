"""Decoupled neural interfaces on digits: hidden layers trained from synthetic gradients.

A 3-hidden-layer ReLU MLP (64-256-256-256-10, plain JAX + optax) on scikit-learn's bundled
digits (1797 real 8x8 images, stratified 75/25 split, seed 0), trained four ways:

- backprop:     ordinary backpropagation through the whole network;
- sg:           every hidden layer i is updated from a synthetic gradient
                g_i = M_i(h_i) predicted by a small learned module M_i, injected with
                `quantizers.inject_gradient(h_i, g_i)` (Jaderberg et al., 2017, "DNI"), so no
                gradient crosses a layer boundary;
- sg+label:     the same with M_i(h_i, onehot(y)) (conditional DNI, "cDNI");
- no-backprop:  only the classifier learns; the hidden layers stay at their random
                initialization (the gradient injected into them is zero).

Each module M_i regresses the gradient its layer's output actually receives from above:
for the top hidden layer the true dL/dh_3; below, the layer above's synthetic gradient
carried back through that layer (DNI's bootstrapped target). Those targets are read off
the same backward pass that updates the layers (see `forward_backward`). Writes
`results.md`, `accuracy.png` and `sg_loss.png`.

    python examples/synthetic_gradients.py              # defaults: 1-2 minutes
    python examples/synthetic_gradients.py --epochs 2   # a smoke run
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _digits import load_digits_split  # noqa: E402

from clusterjax import quantizers  # noqa: E402

NUM_CLASSES = 10
# name: (mode, conditioned on the label)
VARIANTS = {
    "backprop": ("backprop", False),
    "sg": ("sg", False),
    "sg+label": ("sg", True),
    "no-backprop": ("nobp", False),
}


# ------------------------------------------------------------------------------- models


def _dense_init(key, n_in, n_out, scale=None):
    std = np.sqrt(2.0 / n_in) if scale is None else scale  # He init for ReLU layers
    return {"w": std * jax.random.normal(key, (n_in, n_out)), "b": jnp.zeros(n_out)}


def _dense(p, x):
    return x @ p["w"] + p["b"][None, :]


def init_mlp(key, sizes):
    """`{"hidden": [layer, ...], "out": layer}`, each layer `{"w", "b"}`."""
    keys = jax.random.split(key, len(sizes) - 1)
    layers = [_dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
    return {"hidden": layers[:-1], "out": layers[-1]}


def init_sg_modules(key, widths, *, conditioned: bool, hidden: int):
    """One synthetic-gradient module per hidden layer: `[layer, ...]` per module.

    A module maps `h` (concatenated with `onehot(y)` when conditioned) through `hidden`
    ReLU units (none: linear) to a gradient of `h`'s shape. Its last layer starts at
    zero, so training starts from zero synthetic gradients, as in the DNI paper.
    """
    modules = []
    for k, width in zip(jax.random.split(key, len(widths)), widths):
        n_in = width + (NUM_CLASSES if conditioned else 0)
        layers = [_dense_init(k, n_in, hidden)] if hidden else []
        last_in = hidden if hidden else n_in
        layers.append({"w": jnp.zeros((last_in, width)), "b": jnp.zeros(width)})
        modules.append(layers)
    return modules


def synthetic_gradient(module, h, y, *, conditioned: bool):
    """The gradient `module` predicts for activation `h` (per example, of `h`'s shape)."""
    z = (
        jnp.concatenate([h, jax.nn.one_hot(y, NUM_CLASSES, dtype=h.dtype)], -1)
        if conditioned
        else h
    )
    for layer in module[:-1]:
        z = jax.nn.relu(_dense(layer, z))
    return _dense(module[-1], z)


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --------------------------------------------------------------------- the gradient flow


def forward(params, sg_modules, probes, x, y, *, mode: str, conditioned: bool):
    """The network's logits, with gradient injection after every hidden layer.

    Hidden activation `h_i` is handed to the next layer as
    `inject_gradient(h_i, g_i) + probe_i` (modes "sg" and "nobp"; plain `h_i + probe_i`
    for "backprop"). The loss is a batch mean, so the gradient injected into `h_i` is the
    per-example prediction divided by the batch size. `probe_i` is zero: its gradient is
    the cotangent that arrives at layer i's output from above, i.e. the synthetic
    module's regression target (times 1/batch).

    Returns:
      `(logits, hs)`: the logits and the hidden activations `h_i`.
    """
    batch = x.shape[0]
    h, hs = x, []
    for i, layer in enumerate(params["hidden"]):
        h = jax.nn.relu(_dense(layer, h))
        hs.append(h)
        if mode == "sg":
            g = synthetic_gradient(
                sg_modules[i], jax.lax.stop_gradient(h), y, conditioned=conditioned
            )
            h = quantizers.inject_gradient(h, g / batch)
        elif mode == "nobp":
            h = quantizers.inject_gradient(h, jnp.zeros_like(h))
        elif mode != "backprop":
            raise ValueError(f"mode must be 'backprop', 'sg' or 'nobp'; got {mode!r}.")
        h = h + probes[i]
    return _dense(params["out"], h), hs


def forward_backward(params, sg_modules, x, y, *, mode: str, conditioned: bool = False):
    """One forward and backward pass.

    Returns:
      `(loss, grads, hs, targets)`: the batch-mean cross-entropy, its gradient w.r.t.
      `params` as the chosen mode delivers it (the hidden layers' parts are the vjps of
      the injected gradients), the hidden activations, and per hidden layer the gradient
      of the per-example loss w.r.t. its output as seen from above (the regression
      target of that layer's synthetic-gradient module).
    """
    batch = x.shape[0]
    probes = [jnp.zeros((batch, layer["w"].shape[1]), x.dtype) for layer in params["hidden"]]

    def loss_fn(params, probes):
        logits, hs = forward(params, sg_modules, probes, x, y, mode=mode, conditioned=conditioned)
        return _xent(logits, y), hs

    (loss, hs), (grads, d_probes) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, probes
    )
    targets = [batch * d for d in d_probes]
    return loss, grads, hs, targets


def sg_regression_loss(sg_modules, hs, y, targets, *, conditioned: bool):
    """Mean squared error of each module's prediction against its (constant) target."""
    losses = [
        jnp.mean((synthetic_gradient(m, h, y, conditioned=conditioned) - t) ** 2)
        for m, h, t in zip(sg_modules, hs, targets)
    ]
    return sum(losses), jnp.stack(losses)


def make_step(tx, sg_tx, *, mode: str, conditioned: bool):
    """A jitted train step: `(params, sg_modules, opt_state, sg_opt_state, x, y)` ->
    the updated four, the batch loss, and the SG regression loss per hidden layer.

    The MLP is updated with `tx` from the gradients `forward_backward` delivers; in mode
    "sg" the modules are then regressed (with `sg_tx`) onto the targets read off that
    same backward pass.
    """

    @jax.jit
    def step(params, sg_modules, opt_state, sg_opt_state, x, y):
        loss, grads, hs, targets = forward_backward(
            params, sg_modules, x, y, mode=mode, conditioned=conditioned
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if mode == "sg":
            hs = [jax.lax.stop_gradient(h) for h in hs]
            targets = [jax.lax.stop_gradient(t) for t in targets]
            grad_fn = jax.grad(sg_regression_loss, has_aux=True)
            sg_grads, sg_losses = grad_fn(sg_modules, hs, y, targets, conditioned=conditioned)
            sg_updates, sg_opt_state = sg_tx.update(sg_grads, sg_opt_state, sg_modules)
            sg_modules = optax.apply_updates(sg_modules, sg_updates)
        else:
            sg_losses = jnp.zeros(len(hs))
        return params, sg_modules, opt_state, sg_opt_state, loss, sg_losses

    return step


def make_epoch(tx, sg_tx, *, mode: str, conditioned: bool, batch_size: int):
    """A jitted pass over the training set in the given order (`lax.scan` over the steps).

    Returns `(carry, mean loss, mean SG regression loss per layer)`, with
    `carry = (params, sg_modules, opt_state, sg_opt_state)`.
    """
    step = make_step(tx, sg_tx, mode=mode, conditioned=conditioned)

    @jax.jit
    def epoch(carry, x, y, order):
        steps = order.shape[0] // batch_size
        batches = order[: steps * batch_size].reshape(steps, batch_size)

        def body(carry, idx):
            *carry, loss, sg_losses = step(*carry, x[idx], y[idx])
            return tuple(carry), (loss, sg_losses)

        carry, (losses, sg_losses) = jax.lax.scan(body, carry, batches)
        return carry, jnp.mean(losses), jnp.mean(sg_losses, axis=0)

    return epoch


@functools.partial(jax.jit, static_argnames=("conditioned",))
def evaluate(params, sg_modules, x, y, *, conditioned: bool):
    """Test accuracy, and per layer the cosine between synthetic and true gradients."""
    _, _, hs, true_grads = forward_backward(params, sg_modules, x, y, mode="backprop")
    acc = jnp.mean(jnp.argmax(_dense(params["out"], hs[-1]), -1) == y)
    cos = []
    for m, h, g in zip(sg_modules, hs, true_grads):
        pred = synthetic_gradient(m, h, y, conditioned=conditioned)
        denom = jnp.linalg.norm(pred) * jnp.linalg.norm(g)
        cos.append(jnp.where(denom > 0, jnp.sum(pred * g) / jnp.where(denom > 0, denom, 1), 0.0))
    return acc, jnp.stack(cos)


# ------------------------------------------------------------------------------ training


def train(name, data, args):
    mode, conditioned = VARIANTS[name]
    x_tr, y_tr, x_te, y_te = data
    k_params, k_sg = jax.random.split(jax.random.key(args.seed))
    widths = [int(w) for w in args.hidden.split(",")]
    sizes = (x_tr.shape[1], *widths, NUM_CLASSES)
    params = jax.jit(init_mlp, static_argnums=1)(k_params, sizes)
    init_sg = jax.jit(init_sg_modules, static_argnums=1, static_argnames=("conditioned", "hidden"))
    sg_modules = init_sg(k_sg, tuple(widths), conditioned=conditioned, hidden=args.sg_hidden)
    tx, sg_tx = optax.adam(args.lr), optax.adam(args.sg_lr)
    opt_state, sg_opt_state = jax.jit(tx.init)(params), jax.jit(sg_tx.init)(sg_modules)
    epoch = make_epoch(tx, sg_tx, mode=mode, conditioned=conditioned, batch_size=args.batch_size)

    carry = (params, sg_modules, opt_state, sg_opt_state)
    rng = np.random.default_rng(args.seed)
    curve, sg_curve = [], []
    t0 = time.perf_counter()
    with tqdm(
        total=args.epochs, desc=name, unit="epoch", leave=False, disable=args.no_progress
    ) as bar:
        for _ in range(args.epochs):
            carry, losses, sg_losses = epoch(carry, x_tr, y_tr, rng.permutation(len(x_tr)))
            params, sg_modules = carry[:2]
            acc, _ = evaluate(params, sg_modules, x_te, y_te, conditioned=conditioned)
            curve.append(float(acc))
            sg_curve.append(np.asarray(sg_losses))
            bar.update(1)
            bar.set_postfix(loss=f"{float(losses):.3f}", acc=f"{curve[-1]:.3f}")
    seconds = time.perf_counter() - t0
    _, cos = evaluate(params, sg_modules, x_te, y_te, conditioned=conditioned)
    return {
        "curve": curve,
        "sg_curve": np.stack(sg_curve),
        "cos": np.asarray(cos),
        "seconds": seconds,
        "mode": mode,
    }


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=100, help="training epochs per variant (100)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (64)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate of the MLP (3e-4)")
    p.add_argument(
        "--sg-lr", type=float, default=3e-4, help="Adam learning rate of the SG modules (3e-4)"
    )
    p.add_argument("--hidden", default="256,256,256", help="hidden widths (256,256,256)")
    p.add_argument(
        "--sg-hidden", type=int, default=0, help="hidden units of each SG module (0: linear)"
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list of: {', '.join(VARIANTS)}",
    )
    p.add_argument("--seed", type=int, default=0, help="init and shuffling seed (0)")
    p.add_argument("--out", default=None, help="output folder (examples/out/synthetic_gradients/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.abspath(args.out or os.path.join(here, "out", "synthetic_gradients"))
    os.makedirs(out, exist_ok=True)
    data = tuple(jnp.asarray(a) for a in load_digits_split(0))
    names = args.variants.split(",")
    runs = {name: train(name, data, args) for name in names}

    n_layers = len(args.hidden.split(","))
    rows = []
    for name, r in runs.items():
        cos = [f"{c:+.2f}" for c in r["cos"]] if r["mode"] == "sg" else ["-"] * n_layers
        rows.append([name, r["curve"][-1], max(r["curve"]), *cos, f"{r['seconds']:.1f}"])
    header = ["variant", "final test acc", "best test acc"]
    header += [f"cos(SG, true grad) h{i + 1}" for i in range(n_layers)] + ["train s"]
    table = markdown_table(header, rows)
    seconds = time.perf_counter() - start
    text = (
        "# Synthetic gradients (decoupled neural interfaces) on digits\n\n"
        f"MLP 64-{args.hidden.replace(',', '-')}-10 (ReLU), digits stratified 75/25 split "
        f"(seed 0; 1347 train / 450 test); {args.epochs} epochs, batch {args.batch_size}, "
        f"Adam {args.lr} (MLP) and {args.sg_lr} (SG modules, "
        f"{'linear' if not args.sg_hidden else f'{args.sg_hidden} hidden units'}, zero-init "
        f"output), seed {args.seed}. Gradients are injected with `quantizers.inject_gradient`. "
        "'cos(SG, true grad)': cosine between the synthetic gradient and the backpropagated "
        "gradient of each hidden layer's output on the test set, after training.\n\n"
        f"{table}\n\nWall time: {seconds:.0f} s.\n"
    )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    _figures(out, runs)
    print(text)
    print(f"wrote {out}/results.md, accuracy.png, sg_loss.png")
    final = {name: r["curve"][-1] for name, r in runs.items()}
    return {"rows": rows, "accuracy": final, "runs": runs, "out": out, "seconds": seconds}


def markdown_table(header, rows) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _figures(out, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in runs.items():
        ax.plot(np.arange(1, len(r["curve"]) + 1), r["curve"], label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits, 3-hidden-layer MLP: backprop vs synthetic gradients")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n, (name, r) in enumerate((k, v) for k, v in runs.items() if v["mode"] == "sg"):
        for i in range(r["sg_curve"].shape[1]):
            ax.plot(
                r["sg_curve"][:, i],
                color=f"C{n}",
                ls=["-", "--", ":"][i % 3],
                label=f"{name} h{i + 1}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("SG regression loss (MSE)")
    ax.set_title("synthetic-gradient modules: error against their targets")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sg_loss.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
