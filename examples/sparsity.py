"""Sparsity-aware clustering (tfmot's "anti zero-drift" result).

Trains the digits MLP and CNN, prunes every kernel to 50% by magnitude (exactly half of
each kernel's weights, the smallest |w|, set to 0), fine-tunes the pruned model with the
zeros held at zero, then clusters it at each K with and without
`preserve_sparsity=True` and fine-tunes with the README's train step. Reports the
fraction of exact zeros in the clustered kernels (after `cj.init` and after
fine-tuning), whether they sit exactly where the pruned zeros were, and accuracy.

    python examples/sparsity.py
    python examples/sparsity.py --help
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

import clusterjax as cj  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--models", default="mlp,cnn", help="comma list of: mlp, cnn")
    p.add_argument("--clusters", default="8,16", help="comma list of K")
    p.add_argument("--init", default="kmeans++", help="centroid init method")
    p.add_argument("--prune", type=float, default=0.5, help="fraction of each kernel pruned")
    p.add_argument("--prune-epochs", type=int, default=10, help="fine-tune epochs after pruning")
    C.add_common_args(p, "sparsity")
    return p.parse_args(argv)


def magnitude_masks(params, fraction: float):
    """1.0 = keep, 0.0 = pruned: exactly floor(fraction * n) smallest-|w| weights of every
    kernel (ndim >= 2); biases are kept."""

    def one(w):
        w = np.asarray(w)
        if w.ndim < 2:
            return np.ones_like(w)
        order = np.argsort(np.abs(w).ravel(), kind="stable")
        keep = np.ones(w.size, w.dtype)
        keep[order[: int(fraction * w.size)]] = 0
        return keep.reshape(w.shape)

    return jax.tree.map(one, params)


def _pruned_centroid(state, zeros) -> float:
    """Max over kernels of |the centroid holding most of the kernel's pruned weights|."""
    idx = [np.asarray(i) for i in jax.tree.leaves(state.indices)]
    cents = [np.asarray(c) for c in jax.tree.leaves(state.centroids)]
    worst = 0.0
    for i, c, z in zip(idx, cents, zeros):
        if z.any():
            worst = max(worst, abs(float(c[np.bincount(i[z]).argmax()])))
    return worst


def main(argv=None) -> dict:
    args = parse(argv)
    timer = C.Timer()
    out = C.out_dir(args.out)
    data = C.load_data(args.validation)
    x_ev, y_ev = data[2], data[3]
    ks = [int(k) for k in args.clusters.split(",")]
    bar = not args.no_progress
    train = dict(batch_size=args.batch_size, seed=args.seed, bar=bar, max_steps=args.steps)
    rows, records, hist = [], [], {}
    for name in args.models.split(","):
        model = C.MODELS[name]
        params = C.train_plain(
            model,
            C.init_params(model, data[0], args.seed),
            data,
            epochs=args.epochs,
            lr=args.lr,
            desc=f"{name} train",
            **train,
        )
        base = C.accuracy(model, params, x_ev, y_ev)
        masks = magnitude_masks(params, args.prune)
        pruned = jax.tree.map(lambda w, m: w * m, params, masks)
        pruned_acc0 = C.accuracy(model, pruned, x_ev, y_ev)
        pruned = C.train_plain(
            model,
            pruned,
            data,
            epochs=args.prune_epochs,
            lr=args.finetune_lr,
            masks=masks,
            desc=f"{name} pruned fine-tune",
            **train,
        )
        pruned_acc = C.accuracy(model, pruned, x_ev, y_ev)
        kern = [w for _, w in C.kernels(pruned)]
        zeros0 = [w == 0 for w in kern]
        pruned_sparsity = C.sparsity(kern)
        rows.append([name, "float32", "-", "-", "-", "-", "-", "-", "-", base])
        rows.append(
            [name, f"pruned {args.prune:.0%}", "-", f"{pruned_sparsity:.4f}", "-", "-", "-", "-",
             f"{pruned_acc0:.4f}", pruned_acc]
        )  # fmt: skip
        for k in ks:
            for preserve in (False, True):
                spec = cj.ClusterSpec(num_clusters=k, init=args.init, preserve_sparsity=preserve)
                state = cj.init(pruned, {C.KERNELS: spec}, key=jax.random.key(args.seed + 1))
                sp_init = C.sparsity([w for _, w in C.clustered_leaves(pruned, state)])
                before = C.accuracy(model, cj.strip(pruned, state), x_ev, y_ev)
                p2, s2 = C.finetune(
                    model,
                    pruned,
                    state,
                    data,
                    args,
                    desc=f"{name} K={k} preserve_sparsity={preserve}",
                    **train,
                )
                after = C.accuracy(model, cj.strip(p2, s2), x_ev, y_ev)
                stripped = [w for _, w in C.clustered_leaves(p2, s2)]
                sp_after = C.sparsity(stripped)
                same = all(np.array_equal(w == 0, z) for w, z in zip(stripped, zeros0))
                shadow = C.sparsity([w for _, w in C.kernels(p2)])
                drift = _pruned_centroid(s2, zeros0)
                rows.append(
                    [name, f"K={k}", str(preserve), f"{sp_init:.4f}", f"{sp_after:.4f}",
                     "yes" if same else "no", f"{drift:.1e}", f"{shadow:.4f}", before, after]
                )  # fmt: skip
                records.append(
                    {
                        "model": name,
                        "k": k,
                        "preserve": preserve,
                        "pruned_sparsity": pruned_sparsity,
                        "sparsity_init": sp_init,
                        "sparsity_after": sp_after,
                        "same_zeros": same,
                        "shadow_sparsity": shadow,
                        "pruned_centroid": drift,
                        "before": before,
                        "after": after,
                        "pruned_acc": pruned_acc,
                        "base": base,
                    }
                )
                if name == "mlp" and k == ks[0]:
                    hist[preserve] = np.asarray(cj.strip(p2, s2)["Dense_1"]["kernel"]).ravel()
    header = [
        "model",
        "stage",
        "preserve_sparsity",
        "sparsity after cj.init",
        "sparsity after fine-tune",
        "zeros exactly at the pruned positions",
        "|centroid of the pruned weights|",
        "dense (shadow) weights sparsity",
        "acc before fine-tune",
        "acc after fine-tune",
    ]
    table = C.markdown_table(header, rows)
    text = (
        f"# Sparsity-aware clustering: digits, {C.eval_name(args)} accuracy\n\n"
        f"Data: {C.SPLIT}. Baseline {args.epochs} epochs Adam {args.lr}; magnitude pruning "
        f"of {args.prune:.0%} of every kernel, then {args.prune_epochs} epochs Adam "
        f"{args.finetune_lr} with the pruned weights held at 0; then {args.init} clustering "
        f"(per tensor) and {args.finetune_epochs} epochs Adam {args.finetune_lr}"
        f"{'' if args.constant_lr else ' (cosine decay)'} with the README train step; "
        f"seed {args.seed}.\n\n{table}\n\n"
        "Sparsity = fraction of exact zeros over all clustered kernels of the deployable "
        "(`cj.strip`) model. 'dense (shadow) weights' = the trainable float weights behind "
        "the clusters. '|centroid of the pruned weights|' = after fine-tuning, the "
        "largest (over kernels) absolute value of the centroid that most of a kernel's "
        "pruned weights are assigned to. For the pruned row, 'acc before fine-tune' is "
        "right after pruning.\n\n"
        f"{timer.report()}\n"
    )
    C.write_results(out, text)
    _figure(out, hist, ks[0])
    print(text)
    print(f"wrote {out}/results.md" + (", sparsity.png" if hist else ""))
    return {"rows": rows, "records": records, "out": out, "seconds": timer.seconds}


def _figure(out, hist, k):
    if len(hist) < 2:
        return
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for ax, preserve in zip(axes, (False, True)):
        w = hist[preserve]
        values, counts = np.unique(w, return_counts=True)
        ax.bar(values, counts, width=(w.max() - w.min()) / 80, color="steelblue")
        ax.set_yscale("log")
        near = values[np.argmin(np.abs(values))]
        ax.set_title(
            f"preserve_sparsity={preserve}: {np.mean(w == 0):.1%} exact zeros\n"
            f"centroid nearest 0: {near:.2e}",
            fontsize=10,
        )
        ax.set_xlabel("value of the clustered weight")
    axes[0].set_ylabel("weights per centroid")
    fig.suptitle(f"MLP Dense_1 kernel, pruned 50%, clustered K={k}, after fine-tuning")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sparsity.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
