"""The `clusterjax` command line: post-training clustering of checkpoints.

    clusterjax compress INPUT --clusters K [--init kmeans] [--per-channel] [--rules FILE] --out OUT
    clusterjax inspect FILE [--json]
    clusterjax decompress FILE --out OUT

Inputs: `.safetensors`, `.npz` (read with `allow_pickle=False`) and Flax msgpack
(`.msgpack`, read with `flax.serialization.msgpack_restore`); nothing is ever unpickled.
Flat keys such as `Dense_0/kernel` are split on '/' into nested params (other keys, e.g.
`layer.weight`, stay as they are), so leaf paths and rules look the same as in Python.
`decompress` writes the same flat keys back. Errors print one line,
`clusterjax: error: ...`, to stderr and exit with status 2.
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from clusterjax._src.spec import GRANULARITIES, INIT_METHODS

_SPEC_KEYS = (
    "num_clusters", "init", "granularity", "channel_axis", "group_size",
    "preserve_sparsity", "gradient_aggregation", "update_indices", "outliers",
    "cluster_dim", "vector_axis", "lut_dtype", "per_channel_scale",
)  # fmt: skip
_INPUTS = (".safetensors", ".npz", ".msgpack")
_OUTPUTS = (".safetensors", ".npz", ".msgpack")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _nest(flat: dict[str, Any], source: str) -> dict:
    """`{"a/b": x}` -> `{"a": {"b": x}}`; keys without '/' stay as they are."""
    out: dict = {}
    for key in sorted(flat):
        parts = key.split("/")
        if not all(parts):
            raise CLIError(f"{source}: key {key!r} has an empty path component")
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CLIError(
                    f"{source}: key {key!r} lies below the array {'/'.join(parts[: i + 1])!r}"
                )
        if parts[-1] in node:
            raise CLIError(f"{source}: key {key!r} is both an array and a prefix of other keys")
        node[parts[-1]] = flat[key]
    return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Inverse of `_nest`: nested dicts -> `{"a/b": x}`."""
    if not isinstance(tree, dict):
        return {prefix or "array": tree}
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def _check_arrays(tree: Any, source: str) -> dict:
    """Every leaf must be a numeric NumPy array (or scalar); returns the tree as dicts."""
    if not isinstance(tree, dict):
        raise CLIError(
            f"{source}: expected a mapping of names to arrays, got {type(tree).__name__}"
        )
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[str(key)] = _check_arrays(value, source)
            continue
        if isinstance(value, (list, tuple)):
            value = {str(i): v for i, v in enumerate(value)}
            out[str(key)] = _check_arrays(value, source)
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf" and arr.dtype.name != "bfloat16":
            raise CLIError(f"{source}: entry {key!r} is not a numeric array (dtype {arr.dtype})")
        out[str(key)] = arr
    return out


def read_checkpoint(path: str) -> dict:
    """Reads a checkpoint into nested dicts of NumPy arrays (never unpickles).

    Args:
      path: a `.safetensors`, `.npz` or `.msgpack` (Flax) file.

    Returns:
      Nested dicts of arrays. A Flax msgpack checkpoint holding `{"params": ...}` (the
      variables of a linen model) returns its params.

    Raises:
      CLIError: for a missing, unsupported or unreadable file.

    Example:
      >>> import os, tempfile, numpy as np
      >>> from clusterjax._src.cli import read_checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
      >>> np.savez(path, **{"Dense_0/kernel": np.ones((2, 3)), "Dense_0/bias": np.zeros(3)})
      >>> tree = read_checkpoint(path)
      >>> sorted(tree["Dense_0"]), tree["Dense_0"]["kernel"].shape
      (['bias', 'kernel'], (2, 3))
    """
    if not os.path.exists(path):
        raise CLIError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise CLIError(f"not a file: {path}")
    lower = path.lower()
    if not lower.endswith(_INPUTS):
        raise CLIError(f"unsupported input {path!r}: use a {', '.join(_INPUTS)} file")
    try:
        if lower.endswith(".safetensors"):
            from safetensors.numpy import load_file

            return _nest(load_file(path), path)
        if lower.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return _nest({k: z[k] for k in z.files}, path)
        from flax import serialization

        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
        if isinstance(tree, dict) and set(tree) == {"params"}:
            tree = tree["params"]
        return _check_arrays(tree, path)
    except CLIError:
        raise
    except Exception as err:  # corrupt input of any kind: one line, no traceback
        msg = str(err).splitlines()[0] if str(err) else ""
        raise CLIError(f"cannot read {path}: {type(err).__name__}: {msg}") from None


def write_checkpoint(path: str, tree: Any) -> int:
    """Writes nested dicts of arrays as `.safetensors`, `.npz` or `.msgpack`; returns #arrays.

    Nested keys are joined with '/' for the flat formats (the keys `read_checkpoint`
    splits again). The write is atomic and the file gets the permissions of a plain
    `open(path, "wb")` (see `clusterjax/_src/atomic.py`).

    Example:
      >>> import os, tempfile, numpy as np
      >>> from clusterjax._src.cli import read_checkpoint, write_checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), "dense.safetensors")
      >>> write_checkpoint(path, {"Dense_0": {"kernel": np.ones((2, 3), np.float32)}})
      1
      >>> read_checkpoint(path)["Dense_0"]["kernel"].dtype
      dtype('float32')
    """
    from clusterjax._src.atomic import atomic_write

    lower = path.lower()
    flat = {k: np.asarray(v, order="C") for k, v in _flatten(tree).items()}  # keeps 0-d
    if not lower.endswith(_OUTPUTS):
        raise CLIError(f"unsupported output {path!r}: use a {', '.join(_OUTPUTS)} file")
    if lower.endswith(".npz"):
        bf16 = [k for k, v in flat.items() if v.dtype.name == "bfloat16"]
        if bf16:
            raise CLIError(
                f"{path}: .npz cannot hold bfloat16 (NumPy reads it back as raw bytes), "
                f"e.g. {bf16[0]!r}; write .safetensors or .msgpack instead"
            )
    with atomic_write(path) as tmp:
        if lower.endswith(".safetensors"):
            from safetensors.numpy import save_file

            save_file(flat, tmp)
        elif lower.endswith(".npz"):
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to tmp
                np.savez(f, **flat)
        else:
            from flax import serialization

            nested = tree if isinstance(tree, dict) else {"array": tree}
            with open(tmp, "wb") as f:
                f.write(serialization.msgpack_serialize(nested))
    return len(flat)


def _spec_from_json(pattern: str, kw: Any, args: argparse.Namespace):
    from clusterjax._src.spec import ClusterSpec

    if not isinstance(kw, dict):
        raise CLIError(
            f"rules file: rule {pattern!r} maps to {kw!r}; expected null or an object with "
            f"keys from {', '.join(_SPEC_KEYS)}"
        )
    unknown = sorted(set(kw) - set(_SPEC_KEYS))
    if unknown:
        raise CLIError(
            f"rules file: rule {pattern!r} has unknown key(s) {unknown}; allowed: "
            f"{', '.join(_SPEC_KEYS)}"
        )
    kw = dict(kw)
    if "num_clusters" not in kw:
        if args.clusters is None:
            raise CLIError(
                f"rules file: rule {pattern!r} has no num_clusters; give it in the rule "
                "or pass --clusters K"
            )
        kw["num_clusters"] = args.clusters
    kw.setdefault("init", args.init)
    try:
        return ClusterSpec(**kw)
    except (TypeError, ValueError) as err:
        raise CLIError(f"rules file: rule {pattern!r}: {err}") from None


def _read_rules(args: argparse.Namespace) -> list[tuple[str, re.Pattern, Any]]:
    try:
        with open(args.rules, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as err:
        raise CLIError(f"cannot read rules file {args.rules}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CLIError(f"rules file {args.rules} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise CLIError(
            f"rules file {args.rules} must hold a JSON object {{regex: spec kwargs or null}}"
        )
    rules = []
    for pattern, kw in raw.items():
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise CLIError(f"rules file: {pattern!r} is not a valid regex: {err}") from None
        rules.append((pattern, rx, None if kw is None else _spec_from_json(pattern, kw, args)))
    return rules


def _default_spec(args: argparse.Namespace):
    from clusterjax._src.spec import ClusterSpec

    if args.clusters is None:
        raise CLIError("compress needs --clusters K (or --rules FILE)")
    if args.group_size is not None:
        granularity = "group"
    else:
        granularity = "channel" if args.per_channel else "tensor"
    try:
        return ClusterSpec(
            num_clusters=args.clusters,
            init=args.init,
            granularity=granularity,
            channel_axis=args.channel_axis,
            group_size=args.group_size,
            preserve_sparsity=args.preserve_sparsity,
            outliers=args.outliers,
            cluster_dim=args.cluster_dim,
            vector_axis=args.vector_axis,
            lut_dtype=args.lut_dtype,
            per_channel_scale=args.per_channel_scale,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None


def _compress(args: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from clusterjax._src import core, fileformat, packing, summary
    from clusterjax._src.plan import MIN_WEIGHTS_PER_CENTROID, resolve
    from clusterjax._src.tree import leaves_with_paths

    if args.out.lower().endswith(_OUTPUTS):
        raise CLIError(
            f"--out {args.out!r}: compress writes the clusterjax packed format, not "
            f"{os.path.splitext(args.out)[1]}; name it e.g. model.cjx (decompress writes "
            "dense checkpoints)"
        )
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):  # fail before the (long) clustering, not after it
        raise CLIError(f"--out {args.out!r}: no such directory {out_dir}")
    rules = _read_rules(args) if args.rules else None
    spec = None if rules is not None else _default_spec(args)
    params = read_checkpoint(args.input)
    flat = leaves_with_paths(params)
    selection = spec if rules is None else {pattern: s for pattern, _, s in rules}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = resolve(params, selection, caller="compress")
    for w in caught:
        print(f"clusterjax: warning: {str(w.message).removeprefix('compress: ')}", file=sys.stderr)
    if not plan.clustered:
        raise CLIError(
            "no leaf was selected for clustering (by default: floating arrays with ndim >= 2 "
            f"and at least {MIN_WEIGHTS_PER_CENTROID} x K elements per table; check "
            "--clusters / --rules)"
        )
    # One leaf at a time under a progress bar (big checkpoints take a while); the result
    # equals cj.init(params, rules, key=key).
    bar = tqdm(
        total=len(flat), desc="clustering", unit="leaf", file=sys.stderr,
        disable=True if args.quiet else None, leave=False,
    )  # fmt: skip

    def on_leaf(path: str) -> None:
        bar.set_postfix_str(path[-40:], refresh=False)
        bar.update(1)

    with bar:
        state = core.init_from_plan(params, plan, key=jax.random.key(args.seed), on_leaf=on_leaf)
    packed = packing.pack(params, state)
    nbytes = fileformat.save(args.out, packed)
    print(summary._summarize(packed, dict(flat), summary.kept_dense_notes(plan)))
    print(f"wrote {args.out} ({nbytes:,} bytes)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from clusterjax._src import fileformat, summary

    _check_file(args.file)
    with open(args.file, "rb") as f:
        blob = f.read()
    report = summary._summarize(fileformat.loads(blob, packed=True), None)
    if args.json:
        print(json.dumps({"file": args.file, "rows": report.rows, "totals": report.totals}))
    else:
        version = fileformat.file_version(blob)
        print(f"{args.file}: clusterjax packed file, format version {version}")
        print(report)
    return 0


def _decompress(args: argparse.Namespace) -> int:
    from clusterjax._src import fileformat

    if not args.out.lower().endswith(_OUTPUTS):
        raise CLIError(f"unsupported output {args.out!r}: use a {', '.join(_OUTPUTS)} file")
    _check_file(args.file)
    count = write_checkpoint(args.out, fileformat.load(args.file))
    print(f"wrote {args.out} ({count} arrays)")
    return 0


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise CLIError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise CLIError(f"not a file: {path}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise CLIError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `clusterjax` command.

    Example:
      >>> from clusterjax._src.cli import build_parser
      >>> args = build_parser().parse_args(["compress", "m.npz", "-k", "16", "-o", "m.cjx"])
      >>> args.clusters, args.init, args.per_channel
      (16, 'kmeans', False)
    """
    p = _Parser(
        prog="clusterjax",
        description="Weight clustering for JAX/Flax checkpoints: compress, inspect, decompress.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    c = sub.add_parser(
        "compress",
        help="cluster a checkpoint post-training, save it packed, print the summary",
        description="Cluster a .safetensors / .npz / .msgpack checkpoint (no training) and "
        "write the packed clusterjax file. By default every floating array with ndim >= 2 "
        "is clustered; --rules picks leaves and settings per path.",
    )
    c.add_argument("input", help=".safetensors, .npz or .msgpack checkpoint")
    c.add_argument("--clusters", "-k", type=int, metavar="K", help="centroids per table")
    c.add_argument("--init", default="kmeans", choices=INIT_METHODS, help="(default: kmeans)")
    c.add_argument("--per-channel", action="store_true", help="one table per output channel")
    c.add_argument(
        "--group-size", type=int, metavar="G", help="one table per G channels (granularity group)"
    )
    c.add_argument(
        "--channel-axis", type=int, default=-1, help="channel axis (default -1: Flax outputs)"
    )
    c.add_argument("--preserve-sparsity", action="store_true", help="keep exact zeros exactly zero")
    c.add_argument(
        "--outliers",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of each leaf's weights kept exactly, the largest |w| (default 0)",
    )
    c.add_argument(
        "--cluster-dim",
        type=int,
        default=1,
        metavar="D",
        help="vector tables: D consecutive weights along --vector-axis share one index "
        "(default 1: scalar tables)",
    )
    c.add_argument(
        "--vector-axis",
        type=int,
        default=-2,
        help="axis of the vectors with --cluster-dim > 1 (default -2: Flax kernel inputs)",
    )
    c.add_argument(
        "--lut-dtype",
        choices=("int8", "uint8"),
        default=None,
        help="store the tables quantized, one scale per table (default: float tables)",
    )
    c.add_argument(
        "--per-channel-scale",
        action="store_true",
        help="divide each channel (--channel-axis) by its float16 root mean square before "
        "one table is fitted",
    )
    c.add_argument(
        "--rules",
        metavar="FILE",
        help="JSON object {regex: ClusterSpec kwargs or null}, in order, first re.fullmatch "
        "on the '/'-joined path wins; null = leave dense; unmatched leaves stay dense. "
        f"Spec keys: {', '.join(_SPEC_KEYS)} (num_clusters and init default to --clusters "
        f"and --init; granularity: {', '.join(GRANULARITIES)})",
    )
    c.add_argument("--seed", type=int, default=0, help="PRNG seed of the init (default 0)")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    c.add_argument("--out", "-o", required=True, metavar="OUT", help="packed output (.cjx)")
    c.set_defaults(fn=_compress)
    i = sub.add_parser("inspect", help="print the summary table of a packed file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print rows and totals as JSON")
    i.set_defaults(fn=_inspect)
    d = sub.add_parser("decompress", help="expand a packed file to a dense checkpoint")
    d.add_argument("file")
    d.add_argument(
        "--out", "-o", required=True, metavar="OUT", help=".safetensors, .npz or .msgpack"
    )
    d.set_defaults(fn=_decompress)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `clusterjax` console script; returns the exit status.

    Errors in the input, flags or files print one line, `clusterjax: error: ...`, to
    stderr and return 2 (no traceback). Set `CLUSTERJAX_DEBUG=1` to see tracebacks.

    Example:
      >>> from clusterjax._src.cli import main
      >>> main(["inspect", "/no/such/file.cjx"])
      2
    """
    debug = bool(os.environ.get("CLUSTERJAX_DEBUG"))
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except CLIError as err:
        _error(str(err))
        return 2
    except (ValueError, OSError) as err:  # FormatError, bad specs, unwritable outputs
        if debug:
            raise
        if isinstance(err, OSError) and err.strerror:
            _error(f"{err.strerror}: {err.filename}" if err.filename else err.strerror)
        else:
            _error(str(err) or type(err).__name__)
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as err:  # a bug: still one line, unless debugging
        if debug:
            raise
        _error(
            f"internal error {type(err).__name__}: {err} (set CLUSTERJAX_DEBUG=1 for the "
            "traceback and please report it)"
        )
        return 1


def _error(message: str) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "error"
    print(f"clusterjax: error: {first}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
