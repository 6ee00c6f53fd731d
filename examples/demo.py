"""The clusterjax demo: cluster a digits MLP and CNN at K = 4..32 and fine-tune.

Trains a Flax linen MLP (64-256-256-10) and a small CNN on scikit-learn's bundled digits
(1797 real 8x8 images; stratified 75/25 split, seed 0), clusters every kernel with
`cj.init` at each K and init method, fine-tunes with the README's train step, and
prints one table: accuracy before / after fine-tuning, distinct values per kernel,
bits per weight and the stored size. Writes `results.md`, `accuracy_vs_k.png` and
`histogram.png` to the output folder.

    python examples/demo.py                  # defaults: about 2 minutes on 2 CPU cores
    python examples/demo.py --help
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

import clusterjax as cj  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,cnn", help="comma list of mlp, cnn")
    p.add_argument("--clusters", default="4,8,16,32", help="comma list of K")
    p.add_argument("--inits", default="kmeans++,linear", help="comma list of init methods")
    p.add_argument("--epochs", type=int, default=30, help="baseline training epochs")
    p.add_argument("--finetune-epochs", type=int, default=6, help="clustered fine-tune epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples/out/demo", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    t0 = time.time()
    out = C.out_dir(args.out)
    data = C.load_digits_split(seed=0)
    x_te, y_te = data[2], data[3]
    ks = [int(k) for k in args.clusters.split(",")]
    inits = args.inits.split(",")
    bar = not args.no_progress
    rows, results, keep = [], [], {}
    for name in args.models.split(","):
        model = C.MODELS[name]()
        params = model.init(jax.random.key(args.seed), data[0][:1])["params"]
        params = C.train_plain(model, params, data, epochs=args.epochs, seed=args.seed, bar=bar)
        base = C.accuracy(model, params, x_te, y_te)
        fbytes = C.float_bytes(params)
        rows.append([name, "-", "float32", base, base, "-", 32, fbytes, "1.0x"])
        results.append({"model": name, "init": None, "k": None, "before": base, "after": base})
        for init in inits:
            for k in ks:
                spec = cj.ClusterSpec(num_clusters=k, init=init)
                state = cj.init(params, spec, key=jax.random.key(args.seed + 1))
                before = C.accuracy(model, cj.strip(params, state), x_te, y_te)
                p2, s2 = C.train_clustered(
                    model,
                    params,
                    state,
                    data,
                    epochs=args.finetune_epochs,
                    seed=args.seed,
                    bar=bar,
                )
                after = C.accuracy(model, cj.strip(p2, s2), x_te, y_te)
                distinct, _ = C.kernel_stats(p2, s2)
                nbytes, how = C.packed_bytes(p2, s2)
                rows.append(
                    [
                        name,
                        init,
                        k,
                        before,
                        after,
                        distinct,
                        spec.bits,
                        nbytes,
                        f"{fbytes / nbytes:.1f}x",
                    ]
                )
                results.append(
                    {"model": name, "init": init, "k": k, "before": before, "after": after}
                )
                if name == "mlp" and init == inits[0] and k == 8:
                    keep = {"params": params, "state": state}
    header = [
        "model",
        "init",
        "K",
        "acc before fine-tune",
        "acc after",
        "distinct/kernel",
        "bits/weight",
        f"bytes ({how if len(rows) > 1 else 'float32'})",
        "vs float32",
    ]
    table = C.markdown_table(header, rows)
    elapsed = time.time() - t0
    text = (
        "# clusterjax demo: digits (stratified 75/25 split, seed 0)\n\n"
        f"{table}\n\nBaseline = the float32 model; 'acc before fine-tune' = post-training "
        f"clustering alone. Wall time: {elapsed:.0f} s.\n"
    )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    _figures(out, results, keep, ks)
    print(text)
    print(f"wrote {out}/results.md, accuracy_vs_k.png, histogram.png")
    return {"rows": rows, "results": results, "out": out, "seconds": elapsed}


def _figures(out, results, keep, ks):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in results}):
        base = [r for r in results if r["model"] == model and r["k"] is None][0]["after"]
        ax.axhline(base, ls="--", lw=1, color="gray")
        for init in sorted({r["init"] for r in results if r["init"]}):
            pts = [r for r in results if r["model"] == model and r["init"] == init]
            ax.plot([r["k"] for r in pts], [r["after"] for r in pts], "o-", label=f"{model} {init}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("clusters K")
    ax.set_ylabel("test accuracy after fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_k.png"), dpi=120)
    plt.close(fig)
    if keep:
        w = np.asarray(keep["params"]["Dense_1"]["kernel"]).ravel()
        c = np.asarray(keep["state"].centroids["Dense_1"]["kernel"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(w, bins=120, color="steelblue")
        for v in c:
            ax.axvline(v, color="crimson", lw=1)
        ax.set_title("MLP Dense_1 kernel and its K=8 centroids (kmeans++ init)")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "histogram.png"), dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
