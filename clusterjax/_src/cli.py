"""The `clusterjax` command line: post-training clustering of checkpoints.

    clusterjax compress INPUT --clusters K [--init kmeans] [--per-channel] [--rules FILE] --out OUT
    clusterjax inspect FILE
    clusterjax decompress FILE --out OUT

Inputs: `.safetensors`, `.npz` (loaded with `allow_pickle=False`) and Flax msgpack
(`.msgpack`, `flax.serialization`). Flat keys such as `Dense_0/kernel` become nested
params. Errors print one line, `clusterjax: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from clusterjax._src.tree import leaves_with_paths

_SPEC_KEYS = (
    "num_clusters", "init", "granularity", "channel_axis", "group_size",
    "preserve_sparsity", "gradient_aggregation", "update_indices",
)  # fmt: skip


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _nest(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        parts = [p for p in key.split("/" if "/" in key else ".") if p] or [key]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CLIError(f"key {key!r} lies below another array")
        node[parts[-1]] = value
    return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
    else:
        out[prefix[:-1]] = np.asarray(tree)
    return out


def read_checkpoint(path: str) -> dict:
    """Reads a checkpoint into nested dicts of NumPy arrays (never unpickles)."""
    if not os.path.isfile(path):
        raise CLIError(f"no such file: {path}")
    lower = path.lower()
    try:
        if lower.endswith(".safetensors"):
            from safetensors.numpy import load_file

            return _nest(load_file(path))
        if lower.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return _nest({k: z[k] for k in z.files})
        if lower.endswith((".msgpack", ".flax")):
            from flax import serialization

            with open(path, "rb") as f:
                tree = serialization.msgpack_restore(f.read())
            if isinstance(tree, dict) and set(tree) == {"params"}:
                tree = tree["params"]
            return tree
    except CLIError:
        raise
    except Exception as err:  # corrupt input of any kind: one line, no traceback
        raise CLIError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    raise CLIError(f"unsupported input {path!r}: use .safetensors, .npz or .msgpack")


def _rules(args) -> Any:
    import clusterjax as cj

    if args.rules:
        try:
            with open(args.rules) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise CLIError(f"cannot read rules file {args.rules}: {err}") from None
        if not isinstance(raw, dict):
            raise CLIError("the rules file must hold a JSON object {regex: spec or null}")
        rules = {}
        for pattern, kw in raw.items():
            if kw is None:
                rules[pattern] = None
                continue
            if not isinstance(kw, dict) or set(kw) - set(_SPEC_KEYS):
                raise CLIError(
                    f"rule {pattern!r}: expected null or an object with keys from {_SPEC_KEYS}"
                )
            kw = {"num_clusters": args.clusters, **kw}
            rules[pattern] = cj.ClusterSpec(**kw)
        return rules
    return cj.ClusterSpec(
        num_clusters=args.clusters,
        init=args.init,
        granularity="channel" if args.per_channel else "tensor",
        channel_axis=args.channel_axis,
    )


def _compress(args) -> int:
    import jax

    import clusterjax as cj

    if args.clusters is None and not args.rules:
        raise CLIError("compress needs --clusters K (or --rules FILE)")
    params = read_checkpoint(args.input)
    rules = _rules(args)
    leaves = leaves_with_paths(params)

    # One leaf at a time, with a progress bar: large checkpoints take a while.
    state_parts = {}
    with tqdm(total=len(leaves), desc="clustering", file=sys.stderr, disable=args.quiet) as bar:
        for path, leaf in leaves:
            sub = {"x": leaf}
            if isinstance(rules, cj.ClusterSpec):
                sub_rules = rules
            elif any(re.fullmatch(p, path) for p in rules):
                first = next(p for p in rules if re.fullmatch(p, path))
                sub_rules = {"x": rules[first]}
            else:
                sub_rules = {"x": None}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state_parts[path] = cj.init(sub, sub_rules, key=jax.random.key(args.seed))
            bar.update(1)
    treedef = jax.tree.structure(params, is_leaf=lambda x: x is None)
    fields = {
        f: jax.tree.unflatten(treedef, [getattr(state_parts[p], f)["x"] for p, _ in leaves])
        for f in cj.ClusterState._fields
    }
    state = cj.ClusterState(**fields)
    if all(part.specs["x"] is None for part in state_parts.values()):
        raise CLIError("no leaf was selected for clustering (check --clusters / --rules)")
    nbytes = cj.save(args.out, params, state)
    print(cj.summary(params, state))
    print(f"wrote {args.out} ({nbytes:,} bytes)")
    return 0


def _inspect(args) -> int:
    import clusterjax as cj

    if not os.path.isfile(args.file):
        raise CLIError(f"no such file: {args.file}")
    packed = cj.load(args.file, packed=True)
    flat = _flatten_packed(packed)
    rows = []
    total_packed = total_f32 = 0
    for path, leaf in flat.items():
        if isinstance(leaf, cj.PackedArray):
            rows.append((path, "x".join(map(str, leaf.shape)), str(leaf.num_clusters),
                         leaf.granularity, leaf.dtype, leaf.nbytes, leaf.size * 4))  # fmt: skip
        else:
            rows.append((path, "x".join(map(str, leaf.shape)), "-", "-", str(leaf.dtype),
                         leaf.nbytes, leaf.size * 4))  # fmt: skip
        total_packed += rows[-1][5]
        total_f32 += rows[-1][6]
    header = ("path", "shape", "K", "granularity", "dtype", "packed B", "float32 B")
    table = [header] + [r[:5] + (f"{r[5]:,}", f"{r[6]:,}") for r in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    ratio = total_f32 / max(total_packed, 1)
    print(f"total: {total_packed:,} bytes packed vs {total_f32:,} float32 ({ratio:.2f}x)")
    return 0


def _flatten_packed(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten_packed(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _decompress(args) -> int:
    import clusterjax as cj

    if not os.path.isfile(args.file):
        raise CLIError(f"no such file: {args.file}")
    dense = _flatten(cj.load(args.file))
    out = args.out
    if out.lower().endswith(".safetensors"):
        from safetensors.numpy import save_file

        if any(v.dtype.name == "bfloat16" for v in dense.values()):
            raise CLIError("safetensors output of bfloat16 is not supported here; use .npz")
        save_file({k: np.ascontiguousarray(v) for k, v in dense.items()}, out)
    elif out.lower().endswith(".npz"):
        np.savez(out, **dense)
    else:
        raise CLIError(f"unsupported output {out!r}: use .safetensors or .npz")
    print(f"wrote {out} ({len(dense)} arrays)")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clusterjax", description="Weight clustering for JAX checkpoints.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("compress", help="cluster a checkpoint post-training and save it packed")
    c.add_argument("input", help=".safetensors, .npz or .msgpack checkpoint")
    c.add_argument("--clusters", "-k", type=int, help="K, centroids per table")
    c.add_argument("--init", default="kmeans", help="linear|random|density|kmeans++|kmeans")
    c.add_argument("--per-channel", action="store_true", help="one table per output channel")
    c.add_argument("--channel-axis", type=int, default=-1)
    c.add_argument("--rules", help="JSON file {regex: spec kwargs or null}, first match wins")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--out", "-o", required=True, help="packed output file")
    c.set_defaults(fn=_compress)
    i = sub.add_parser("inspect", help="print the table of a packed file")
    i.add_argument("file")
    i.set_defaults(fn=_inspect)
    d = sub.add_parser("decompress", help="expand a packed file to dense arrays")
    d.add_argument("file")
    d.add_argument("--out", "-o", required=True, help=".safetensors or .npz")
    d.set_defaults(fn=_decompress)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `clusterjax` console script."""
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except CLIError as err:
        print(f"clusterjax: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:  # FormatError, bad specs, unreadable files
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"clusterjax: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
