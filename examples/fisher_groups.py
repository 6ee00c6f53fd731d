"""Post-training clustering with Fisher importance, and grouped-channel tables.

Trains the digits MLP (64-256-256-10, Flax linen) to convergence, then clusters every
kernel *without any fine-tuning*:

1. per channel at K = 4 and 8, with `init="kmeans"` plain and weighted by the diagonal
   empirical Fisher information (`cj.fisher_importance`: per-example squared gradients
   over the training set), as SqueezeLLM / coremltools' sensitive k-means do: undamped,
   and damped (`cj.init(..., importance_damping=1.0)`: each weight's importance plus
   its table's mean importance). Over `--seeds` independently trained models, since one
   test image is 0.22 points;
2. with one centroid table per group of 1 (= per channel), 8, 32 output channels and
   per tensor, at the same K, plain and Fisher-weighted (damped), on the first model:
   test accuracy against the stored size (bit-packed indices plus float32 tables plus
   dense biases).

Writes `results.md` and `fisher_groups.png` to the output folder, which it prints.

    python examples/fisher_groups.py              # about 5-6 minutes on 2 CPU cores
    python examples/fisher_groups.py --help
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import MLP  # noqa: E402
from _digits import load_digits_split  # noqa: E402

import clusterjax as cj  # noqa: E402

MODEL = MLP()  # 64-256-256-10, the MLP of every example


def xent(params, batch):
    x, y = batch
    logits = MODEL.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def weighted_xent(params, batch):
    """Cross-entropy scaled by a per-example weight (see `model_label_batches`)."""
    x, y, weight = batch
    logits = MODEL.apply({"params": params}, x)
    return jnp.mean(weight * optax.softmax_cross_entropy_with_integer_labels(logits, y))


def model_label_batches(params, batches, classes=10):
    """Every example once per class y, weighted by sqrt(p(y | x)) of the model.

    The squared per-example gradient of `sqrt(p_y) * CE(y)` is `p_y (d log p_y)^2`, so
    summing over the copies gives the Fisher information under the model's own predictive
    distribution, `E_x E_{y ~ p(.|x)} (d log p(y|x))^2`, instead of the empirical Fisher at
    the true labels, which for a model that fits its training set (train loss ~1e-4) is
    dominated by the few examples that still have a gradient.
    """
    out = []
    for x, _ in batches:
        p = jax.nn.softmax(MODEL.apply({"params": params}, x))
        xs = np.repeat(np.asarray(x), classes, axis=0)
        ys = np.tile(np.arange(classes, dtype=np.int32), len(x))
        out.append((xs, ys, np.sqrt(np.asarray(p, np.float32)).reshape(-1)))
    return out


@jax.jit
def evaluate(params, x, y):
    logits = MODEL.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jnp.mean(jnp.argmax(logits, -1) == y), loss


def train(params, x, y, *, epochs, lr, batch_size, seed, progress):
    """Adam with a cosine-decayed learning rate; returns params and the last-epoch loss."""
    steps_per_epoch = len(x) // batch_size
    tx = optax.adam(optax.cosine_decay_schedule(lr, max(epochs * steps_per_epoch, 1)))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(xent)(params, (xb, yb))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    with tqdm(range(epochs), desc="train", disable=not progress, file=sys.stderr) as bar:
        for _ in bar:
            order = rng.permutation(len(x))
            epoch = []
            for i in range(steps_per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
                epoch.append(loss)
            losses.append(float(np.mean(jax.device_get(epoch))))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return params, losses


def rules_for(params, k: int, group: str, init: str):
    """One spec per kernel: `group` is "1" (per channel), "8", "32", ... or "tensor".

    A kernel whose output channels the group size does not divide (the 10-way classifier
    for 8 and 32) gets a single table (per tensor).
    """
    rules = {}
    for path, w in [(cj.path_str(p), w) for p, w in jax.tree_util.tree_leaves_with_path(params)]:
        if np.ndim(w) < 2:
            continue
        channels = np.shape(w)[-1]
        if group == "tensor" or channels % int(group):
            spec = cj.ClusterSpec(num_clusters=k, init=init)
        elif int(group) == 1:
            spec = cj.ClusterSpec(num_clusters=k, init=init, granularity="channel")
        else:
            spec = cj.ClusterSpec(
                num_clusters=k, init=init, granularity="group", group_size=int(group)
            )
        rules[path] = spec
    return rules


def size_bytes(params, state) -> tuple[int, int]:
    """(stored bytes, number of tables): N * bits / 8 + tables * K * 4 + dense leaves."""
    total, tables = 0, 0
    flat = jax.tree.leaves(params)
    cents = jax.tree.leaves(state.centroids, is_leaf=lambda c: c is None)
    specs = jax.tree.leaves(
        state.specs, is_leaf=lambda s: s is None or isinstance(s, cj.ClusterSpec)
    )
    for w, c, s in zip(flat, cents, specs):
        if c is None:
            total += int(np.size(w)) * 4
            continue
        n_tables = int(np.size(c)) // s.num_clusters
        tables += n_tables
        total += -(-int(np.size(w)) * s.bits // 8) + int(np.size(c)) * 4
    return total, tables


def weighted_sse(params, dense, fisher) -> float:
    """sum F (w - q(w))^2 over the clustered kernels: what the weighted k-means minimizes."""
    total = 0.0
    for w, q, f in zip(
        jax.tree.leaves(params),
        jax.tree.leaves(dense),
        jax.tree.leaves(fisher, is_leaf=lambda a: a is None),
    ):
        if f is not None:
            total += float(jnp.sum(f * (w - q).astype(jnp.float32) ** 2))
    return total


def damped_per_channel(fisher, damping: float):
    """`F + damping * mean(F)` per output channel (the per-channel tables' means)."""
    return jax.tree.map(
        lambda f: None if f is None else f + damping * jnp.mean(f, axis=0, keepdims=True),
        fisher,
        is_leaf=lambda a: a is None,
    )


def max_distinct_per_table(dense, state) -> int:
    """Largest number of distinct values in any one centroid table's share of a kernel."""
    worst = 0
    flat = jax.tree.leaves(dense)
    specs = jax.tree.leaves(
        state.specs, is_leaf=lambda s: s is None or isinstance(s, cj.ClusterSpec)
    )
    for w, s in zip(flat, specs):
        if s is None:
            continue
        w = np.asarray(w)
        if s.granularity == "tensor":
            groups = w.reshape(1, -1)
        else:
            size = 1 if s.granularity == "channel" else s.group_size
            moved = np.moveaxis(w, s.channel_axis, 0)
            groups = moved.reshape(moved.shape[0] // size, -1)
        worst = max(worst, max(len(np.unique(g)) for g in groups))
    return worst


def markdown_table(header, rows) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=200, help="training epochs (to convergence)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--clusters", default="4,8", help="comma list of K")
    p.add_argument(
        "--groups", default="1,8,32,tensor", help="comma list of group sizes and/or 'tensor'"
    )
    p.add_argument("--init", default="kmeans", help="init method (kmeans: weighted k-means)")
    p.add_argument(
        "--fisher-examples",
        type=int,
        default=None,
        help="training examples for the Fisher estimate (default: all)",
    )
    p.add_argument(
        "--fisher",
        choices=("empirical", "model"),
        default="empirical",
        help="empirical: squared gradients of the loss at the true labels; model: expected "
        "over labels drawn from the model's own prediction (the Fisher information proper)",
    )
    p.add_argument(
        "--damping",
        type=float,
        default=1.0,
        help="importance_damping of the damped Fisher runs (and of the group table)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=8,
        help="independently trained models for the per-channel plain-vs-Fisher table",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (model init, batch order)")
    p.add_argument("--out", default="examples/out/fisher_groups", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def fisher_of(params, batches, kind):
    """Diagonal Fisher of the kernels: empirical, or under the model's own predictions."""
    kernels = r".*/kernel"
    if kind == "empirical":
        return cj.fisher_importance(xent, params, batches, select=kernels, chunk_size=64)
    return cj.fisher_importance(
        weighted_xent, params, model_label_batches(params, batches), select=kernels,
        chunk_size=64,
    )  # fmt: skip


def main(argv=None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    ks = [int(k) for k in args.clusters.split(",")]
    groups = [g.strip() for g in args.groups.split(",")]
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    n_fisher = len(x_tr) if args.fisher_examples is None else args.fisher_examples
    batches = [(x_tr[i : i + 64], y_tr[i : i + 64]) for i in range(0, min(n_fisher, len(x_tr)), 64)]

    # ---- table 1: per channel, plain vs Fisher vs damped Fisher, one row per model.
    fisher_rows, per_seed, models = [], [], []
    fisher_seconds = 0.0
    seeds = range(args.seed, args.seed + max(args.seeds, 1))
    for seed in tqdm(seeds, desc="models", disable=not progress, file=sys.stderr):
        params = MODEL.init(jax.random.key(seed), x_tr[:1])["params"]
        params, losses = train(
            params,
            x_tr,
            y_tr,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=seed,
            progress=progress,
        )
        t_f = time.perf_counter()
        fisher = jax.block_until_ready(fisher_of(params, batches, args.fisher))
        fisher_seconds += time.perf_counter() - t_f
        damped = damped_per_channel(fisher, args.damping)
        models.append((seed, params, fisher, losses))
        key = jax.random.key(seed + 1)
        for k in ks:
            rules = rules_for(params, k, "1", args.init)
            row = {}
            for name, imp, lam in (
                ("plain", None, 0.0),
                ("fisher", fisher, 0.0),
                ("damped", fisher, args.damping),
            ):
                state = cj.init(params, rules, key=key, importance=imp, importance_damping=lam)
                dense = cj.strip(params, state)
                acc, loss = evaluate(dense, x_te, y_te)
                row[name] = (float(acc), float(loss), weighted_sse(params, dense, damped))
            per_seed.append((seed, k, row))
            fisher_rows.append(
                [seed, k]
                + [row[n][0] for n in ("plain", "fisher", "damped")]
                + [row[n][1] for n in ("plain", "fisher", "damped")]
                + [f"{row['plain'][2]:.3e}", f"{row['damped'][2]:.3e}"]
            )
    mean_rows = []
    for k in ks:
        rows = [r for _, kk, r in per_seed if kk == k]

        def mean(name, i, rows=rows):
            return float(np.mean([r[name][i] for r in rows]))

        wins = [
            sum(r[name][0] > r["plain"][0] for r in rows)
            - sum(r[name][0] < r["plain"][0] for r in rows)
            for name in ("fisher", "damped")
        ]
        mean_rows.append(
            [f"mean of {len(rows)}", k]
            + [mean(n, 0) for n in ("plain", "fisher", "damped")]
            + [mean(n, 1) for n in ("plain", "fisher", "damped")]
            + [f"{wins[0]:+d}", f"{wins[1]:+d}"]
        )

    # ---- table 2: granularity vs size, on the first model, plain vs damped Fisher.
    seed, params, fisher, losses = models[0]
    train_acc, train_loss = evaluate(params, x_tr, y_tr)
    base_acc, base_loss = evaluate(params, x_te, y_te)
    float_bytes = sum(int(np.size(w)) * 4 for w in jax.tree.leaves(params))
    key = jax.random.key(seed + 1)
    results = {}  # (group, K, weighted) -> row dict
    jobs = [(g, k, wt) for g in groups for k in ks for wt in (False, True)]
    for g, k, wt in tqdm(jobs, desc="cluster", disable=not progress, file=sys.stderr):
        state = cj.init(
            params,
            rules_for(params, k, g, args.init),
            key=key,
            importance=fisher if wt else None,
            importance_damping=args.damping if wt else 0.0,
        )
        dense = cj.strip(params, state)
        acc, loss = evaluate(dense, x_te, y_te)
        size, tables = size_bytes(params, state)
        distinct = max_distinct_per_table(dense, state)
        assert distinct <= k, (g, k, distinct)
        results[(g, k, wt)] = dict(
            acc=float(acc), loss=float(loss), size=size, tables=tables, distinct=distinct
        )
    group_rows = []
    for g in groups:
        for k in ks:
            p, f = results[(g, k, False)], results[(g, k, True)]
            name = {"1": "channel (group 1)", "tensor": "tensor"}.get(g, f"group {g}")
            group_rows.append(
                [name, k, p["tables"], f"{p['size']:,}", f"{float_bytes / p['size']:.1f}x"]
                + [p["acc"], f["acc"], p["distinct"]]
            )

    cmd = "python examples/fisher_groups.py " + " ".join(argv if argv is not None else sys.argv[1:])
    fisher_kind = (
        "empirical (squared gradients at the true labels)"
        if args.fisher == "empirical"
        else "under the model's predictive distribution (every label y weighted by p(y|x))"
    )
    header = ["seed", "K", "acc plain", "acc Fisher", "acc damped"]
    header += ["loss plain", "loss Fisher", "loss damped"]
    text = [
        "## Fisher-weighted post-training clustering and grouped tables (issue #6)",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Digits MLP 64-256-256-10 trained {args.epochs} epochs (Adam {args.lr:g}, cosine, "
        f"batch {args.batch_size}), {len(models)} models (seeds {seeds.start}.."
        f"{seeds.stop - 1}); the first: train loss {float(train_loss):.2e}, train accuracy "
        f"{float(train_acc):.4f}; test accuracy {float(base_acc):.4f}, test loss "
        f"{float(base_loss):.4f}, float32 size {float_bytes:,} bytes. All three kernels "
        f"clustered with `init={args.init!r}`, **no fine-tuning**. Fisher = "
        f"`cj.fisher_importance` over {sum(len(b[0]) for b in batches)} training examples "
        f"({fisher_seconds / len(models):.1f} s per model), {fisher_kind}.",
        "",
        "Per-channel tables, plain vs Fisher-weighted k-means (test set, 450 images: one "
        "image is 0.0022). *Fisher*: importance = F; *damped*: "
        f"`importance_damping={args.damping:g}`, F + {args.damping:g} x the mean F of the "
        "weight's table. Weighted SSE = sum (damped F) (w - q(w))^2 over the kernels, the "
        "objective the damped run minimizes (half of it is the diagonal second-order "
        "estimate of the loss increase):",
        "",
        markdown_table(header + ["wSSE plain", "wSSE damped"], fisher_rows),
        "",
        "Means over the models; *net wins* = models where the Fisher run is more accurate "
        "than plain minus models where it is less:",
        "",
        markdown_table(header + ["net wins Fisher", "net wins damped"], mean_rows),
        "",
        "Granularity vs size on the first model (size = bit-packed indices N * "
        "ceil(log2 K) / 8 + tables * K * 4 bytes + float32 biases; ratio vs float32; the "
        "10-channel classifier kernel gets one table when the group size does not divide "
        "10); *acc Fisher* = damped. `max distinct` = the most distinct values of any one "
        "table's weights after `cj.strip` (<= K):",
        "",
        markdown_table(
            ["tables", "K", "#tables", "bytes", "ratio", "acc plain", "acc Fisher", "max distinct"],
            group_rows,
        ),
        "",
    ]
    out_md = os.path.join(args.out, "results.md")
    with open(out_md, "w") as f:
        f.write("\n".join(text))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, marker in zip(ks, "os^vD"):
        for wt, style in ((False, "--"), (True, "-")):
            rows = [results[(g, k, wt)] for g in groups]
            axes[0].plot(
                [r["size"] / 1024 for r in rows],
                [r["acc"] for r in rows],
                style,
                marker=marker,
                label=f"K={k} {'Fisher' if wt else 'plain'}",
            )
            if wt:
                for g, r in zip(groups, rows):
                    axes[0].annotate(g, (r["size"] / 1024, r["acc"]), fontsize=7)
    axes[0].axhline(float(base_acc), color="gray", lw=0.8, label="float32")
    axes[0].set(xlabel="stored size (KiB)", ylabel="test accuracy", title="group size (labels)")
    axes[0].legend(fontsize=7)
    xs = np.arange(len(ks))
    for i, name in enumerate(("plain k-means", "Fisher", f"Fisher damped {args.damping:g}")):
        axes[1].bar(xs + (i - 1) * 0.27, [r[2 + i] for r in mean_rows], 0.27, label=name)
    axes[1].set_xticks(xs, [f"K={k}" for k in ks])
    axes[1].set(
        ylabel="mean test accuracy", title=f"per channel, no fine-tuning, {len(models)} models"
    )
    lo = min(min(r[2:5]) for r in mean_rows)
    axes[1].set_ylim(max(0.0, lo - 0.05), 1.0)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(args.out, "fisher_groups.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)

    print("\n".join(text))
    print(f"wrote {out_md} and {png} ({time.perf_counter() - t0:.0f} s)")
    print(f"output folder: {os.path.abspath(args.out)}")
    return {
        "results": results,
        "base_acc": float(base_acc),
        "train_losses": losses,
        "fisher_rows": fisher_rows,
        "mean_rows": mean_rows,
        "group_rows": group_rows,
        "out": args.out,
    }


if __name__ == "__main__":
    main()
