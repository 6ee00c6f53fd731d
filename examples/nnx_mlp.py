"""The digits MLP (64-256-256-10) written with Flax nnx, clustered via `cj.nnx_merge`.

The nnx counterpart of the demo's MLP: trains it the idiomatic nnx way
(`nnx.Optimizer` + `nnx.jit`), splits it once with `nnx.split(model, nnx.Param, ...)`,
clusters the `Param` state at each K with the README's nnx train step, deploys with
`nnx.merge(graphdef, cj.strip(params, state), rest)`, and round-trips the packed model
through `cj.save` / `cj.load`. Data: scikit-learn's digits, stratified 75/25 split,
seed 0.

    python examples/nnx_mlp.py
    python examples/nnx_mlp.py --help
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

import clusterjax as cj  # noqa: E402


class MLP(nnx.Module):
    """64-256-256-10 with ReLU, the same network as the linen `_common.MLP`."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 256, rngs=rngs)
        self.l2 = nnx.Linear(256, 256, rngs=rngs)
        self.l3 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nnx.relu(self.l1(x))
        x = nnx.relu(self.l2(x))
        return self.l3(x)


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--clusters", default="4,8,16,32", help="comma list of K")
    p.add_argument("--init", default="kmeans++", help="centroid init method")
    p.add_argument(
        "--granularity", default="tensor", choices=["tensor", "channel"], help="centroid tables"
    )
    C.add_common_args(p, "nnx_mlp")
    return p.parse_args(argv)


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def plain_step(model, optimizer, x, y):
    """Ordinary nnx training: the model and optimizer are updated in place."""
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


@functools.cache
def clustered_step(graphdef, lr: float, decay_steps: int | None):
    """(tx, step): the README's nnx train step, verbatim."""
    tx = cj.optimizer(C.adam(lr, decay_steps))

    @jax.jit
    def nnx_train_step(params, state, opt_state, rest, x, y):
        def loss_fn(params, centroids):
            model = cj.nnx_merge(graphdef, params, state._replace(centroids=centroids), rest)
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, state.centroids)
        updates, opt_state = tx.update(
            grads, opt_state, (params, state.centroids), cluster_state=state
        )
        params, centroids = optax.apply_updates((params, state.centroids), updates)
        state = cj.update_indices(params, state._replace(centroids=centroids))
        return params, state, opt_state, loss

    return tx, nnx_train_step


@functools.cache
def _logits(graphdef):
    return jax.jit(lambda params, rest, x: nnx.merge(graphdef, params, rest)(x))


def accuracy(graphdef, params, rest, x, y) -> float:
    return float(jnp.mean(jnp.argmax(_logits(graphdef)(params, rest, x), -1) == y))


def main(argv=None) -> dict:
    args = parse(argv)
    timer = C.Timer()
    out = C.out_dir(args.out)
    data = C.load_data(args.validation)
    x_tr, y_tr, x_ev, y_ev = data
    ks = [int(k) for k in args.clusters.split(",")]
    bar = not args.no_progress

    # 1. Plain nnx training.
    model = MLP(nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
    steps = args.epochs * (len(x_tr) // args.batch_size)
    steps = steps if args.steps is None else min(steps, args.steps)
    rng = np.random.default_rng(args.seed)
    with C.progress(steps, "nnx train", bar) as pbar:
        for n, idx in enumerate(C.batches(rng, len(x_tr), args.batch_size, args.epochs)):
            if n == steps:
                break
            loss = plain_step(model, optimizer, x_tr[idx], y_tr[idx])
            pbar.update(1)
            if n % 10 == 0:
                pbar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)

    # 2. Split once; the Param state is what gets clustered.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    base = accuracy(graphdef, params, rest, x_ev, y_ev)
    fbytes = C.float32_bytes(params)
    rows = [["float32", base, base, "-", "-", 32, fbytes, "1.0x"]]
    results, summary_text = [], ""
    for k in ks:
        spec = cj.ClusterSpec(num_clusters=k, init=args.init, granularity=args.granularity)
        state = cj.init(params, {C.KERNELS: spec}, key=jax.random.key(args.seed + 1))
        before = accuracy(graphdef, cj.strip(params, state), rest, x_ev, y_ev)
        ft_steps = args.finetune_epochs * (len(x_tr) // args.batch_size)
        ft_steps = ft_steps if args.steps is None else min(ft_steps, args.steps)
        tx, step = clustered_step(
            graphdef, args.finetune_lr, None if args.constant_lr else ft_steps
        )
        p, s, opt_state = params, state, tx.init((params, state.centroids))
        rng = np.random.default_rng(args.seed)
        batches = C.batches(rng, len(x_tr), args.batch_size, args.finetune_epochs)
        with C.progress(ft_steps, f"nnx K={k}", bar) as pbar:
            for n, idx in enumerate(batches):
                if n == ft_steps:
                    break
                p, s, opt_state, loss = step(p, s, opt_state, rest, x_tr[idx], y_tr[idx])
                pbar.update(1)
                if n % 10 == 0:
                    pbar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
        # 3. Deploy: a plain nnx model with at most K values per kernel ...
        deployed = nnx.merge(graphdef, cj.strip(p, s), rest)
        after = float(jnp.mean(jnp.argmax(deployed(x_ev), -1) == y_ev))
        # ... and the same model through the packed file.
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "mlp.cjx")
            cj.save(path, cj.pack(p, s))
            nbytes = os.path.getsize(path)
            loaded = nnx.merge(graphdef, nnx.State(cj.load(path)), rest)
        from_file = float(jnp.mean(jnp.argmax(loaded(x_ev), -1) == y_ev))
        distinct = C.distinct_per_kernel(p, s)
        rows.append(
            [k, before, after, from_file, distinct, spec.bits, nbytes, f"{fbytes / nbytes:.1f}x"]
        )
        results.append({"k": k, "before": before, "after": after, "file": from_file})
        if k == (16 if 16 in ks else ks[-1]):
            summary_text = (
                f"`cj.summary` at K={k} after fine-tuning:\n\n```\n{cj.summary(p, s)}\n```\n"
            )
    header = [
        "K",
        "acc before fine-tune",
        "acc after",
        "acc loaded from cj.save file",
        "distinct values per kernel",
        "index bits",
        "file bytes",
        "vs float32",
    ]
    table = C.markdown_table(header, rows)
    text = (
        f"# Flax nnx MLP: digits, {C.eval_name(args)} accuracy\n\n"
        f"Data: {C.SPLIT}. nnx MLP 64-256-256-10 trained {args.epochs} epochs with "
        f"`nnx.Optimizer(adam({args.lr}))`; {args.init} clustering ({args.granularity} "
        f"tables), {args.finetune_epochs} epochs Adam {args.finetune_lr}"
        f"{'' if args.constant_lr else ' (cosine decay)'} with the README nnx train step "
        f"(`cj.nnx_merge`); seed {args.seed}.\n\n{table}\n\n{summary_text}\n"
        f"{timer.report()}\n"
    )
    C.write_results(out, text)
    _figure(out, base, results, ks)
    print(text)
    print(f"wrote {out}/results.md, accuracy_vs_k.png")
    return {"rows": rows, "results": results, "out": out, "seconds": timer.seconds}


def _figure(out, base, results, ks):
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.axhline(base, ls="--", lw=1, color="gray", label="float32")
    ax.plot(ks, [r["after"] for r in results], "o-", label="clustered + fine-tuned")
    ax.plot(ks, [r["before"] for r in results], "x:", label="clustered, no fine-tune")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("clusters K")
    ax.set_ylabel("accuracy")
    ax.set_title("nnx MLP")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_k.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
