"""Differentiable k-means (DKM) vs the straight-through estimator at 1 and 2 bits.

Trains the digits MLP and CNN, clusters every kernel per tensor at K = 2 and K = 4 with
the same kmeans init, and fine-tunes each with the README's train step twice: with
`assignment="hard"` (nearest centroid, straight-through gradient) and with
`assignment="dkm"` (soft attention to the centroids, re-estimated in every forward pass).
Same data, epochs, optimizer, learning-rate schedule and batch order; several seeds.
Accuracy is that of the deployable model, `cj.strip` (hard assignment), in both modes.

    python examples/dkm.py
    python examples/dkm.py --quick        # 1 seed, few epochs: a smoke run
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

MODES = ("hard", "dkm")


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--models", default="mlp,cnn", help="comma list of: mlp, cnn")
    p.add_argument("--clusters", default="2,4", help="comma list of K")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--temperature", type=float, default=None, help="DKM tau (default: auto)")
    p.add_argument("--dkm-iters", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 seed, 3 + 2 epochs")
    C.add_common_args(p, "dkm")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.finetune_epochs = "0", 3, 2
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    timer = C.Timer()
    out = C.out_dir(args.out)
    data = C.load_data(args.validation)
    x_ev, y_ev = data[2], data[3]
    ks = [int(k) for k in args.clusters.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    bar = not args.no_progress
    acc: dict = {}  # (model, K, mode) -> [accuracy per seed]
    base: dict = {}
    before: dict = {}
    for name in args.models.split(","):
        model = C.MODELS[name]
        for seed in seeds:
            train = dict(batch_size=args.batch_size, seed=seed, bar=bar, max_steps=args.steps)
            params = C.train_plain(
                model,
                C.init_params(model, data[0], seed),
                data,
                epochs=args.epochs,
                lr=args.lr,
                desc=f"{name} seed {seed} train",
                **train,
            )
            base.setdefault(name, []).append(C.accuracy(model, params, x_ev, y_ev))
            for k in ks:
                for mode in MODES:
                    extra = {}
                    if mode == "dkm":
                        extra = dict(temperature=args.temperature, dkm_iters=args.dkm_iters)
                    spec = cj.ClusterSpec(num_clusters=k, assignment=mode, **extra)
                    state = cj.init(params, {C.KERNELS: spec}, key=jax.random.key(seed + 1))
                    if mode == "hard":
                        before.setdefault((name, k), []).append(
                            C.accuracy(model, cj.strip(params, state), x_ev, y_ev)
                        )
                    p2, s2 = C.finetune(
                        model,
                        params,
                        state,
                        data,
                        args,
                        desc=f"{name} seed {seed} K={k} {mode}",
                        **train,
                    )
                    a = C.accuracy(model, cj.strip(p2, s2), x_ev, y_ev)
                    acc.setdefault((name, k, mode), []).append(a)
    rows = []
    for name in args.models.split(","):
        for k in ks:
            st, dk = np.array(acc[(name, k, "hard")]), np.array(acc[(name, k, "dkm")])
            rows.append(
                [name, k, _ms(base[name]), _ms(before[(name, k)]), _ms(st), _ms(dk),
                 f"{np.mean(dk - st):+.4f}", f"{int(np.sum(dk > st))}/{int(np.sum(dk < st))}",
                 " ".join(f"{v:.3f}" for v in st), " ".join(f"{v:.3f}" for v in dk)]
            )  # fmt: skip
    header = [
        "model",
        "K",
        "float32",
        "clustered, before fine-tune",
        "straight-through",
        "DKM",
        "DKM - ST (mean)",
        "seeds DKM better/worse",
        "ST per seed",
        "DKM per seed",
    ]
    table = C.markdown_table(header, rows)
    tau = "auto" if args.temperature is None else f"{args.temperature:g}"
    text = (
        f"# DKM vs straight-through: digits, {C.eval_name(args)} accuracy\n\n"
        f"Data: {C.SPLIT}. Baseline {args.epochs} epochs Adam {args.lr}; then every kernel "
        f"clustered per tensor (kmeans init) and fine-tuned {args.finetune_epochs} epochs "
        f"Adam {args.finetune_lr}{'' if args.constant_lr else ' (cosine decay)'}, batch "
        f"{args.batch_size}, with the README train step, once per assignment mode "
        f"(DKM: temperature {tau}, dkm_iters {args.dkm_iters}); seeds {args.seeds} "
        "(model init, batch order and cluster init). Accuracy of the `cj.strip` model "
        f"(hard assignment), mean +- std over seeds.\n\n{table}\n\n{timer.report()}\n"
    )
    C.write_results(out, text)
    _figure(out, acc, base, args.models.split(","), ks)
    print(text)
    print(f"wrote {out}/results.md, dkm.png")
    return {"acc": acc, "base": base, "out": out, "seconds": timer.seconds}


def _ms(v) -> str:
    v = np.asarray(v)
    return f"{v.mean():.4f} +- {v.std():.4f}"


def _figure(out, acc, base, models, ks):
    plt = C.pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        x = np.arange(len(ks))
        for j, (mode, label) in enumerate((("hard", "straight-through"), ("dkm", "DKM"))):
            vals = [np.array(acc[(name, k, mode)]) for k in ks]
            ax.bar(x + (j - 0.5) * 0.38, [v.mean() for v in vals], 0.38, label=label,
                   yerr=[v.std() for v in vals], capsize=3)  # fmt: skip
            for i, v in enumerate(vals):
                ax.scatter(np.full(len(v), x[i] + (j - 0.5) * 0.38), v, color="k", s=8, zorder=3)
        ax.axhline(np.mean(base[name]), color="gray", ls="--", lw=1, label="float32")
        ax.set_xticks(x, [f"K={k}" for k in ks])
        lo = min(min(acc[(name, k, m)]) for k in ks for m in MODES)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.set_title(f"digits {name.upper()}, per-tensor tables")
        ax.set_ylabel("test accuracy (cj.strip)")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "dkm.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
