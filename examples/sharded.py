"""Data- and model-parallel clustered training of the digits MLP on a device mesh.

A 2 x 4 mesh ('data', 'model') of 8 devices: on a CPU-only machine the script sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before jax is imported, so 8 fake
CPU devices stand in for accelerators. The MLP 64-256-256-10 is laid out Megatron-style:
the first two kernels are split column-wise (output channels) over 'model', the
classifier row-wise (input rows), and every batch is split over 'data'. The script

1. creates the params directly on the mesh (`jax.jit(model.init, out_shardings=...)`)
   and pre-trains them dense for `--pretrain-steps`;
2. clusters every kernel with `cj.init` under `jax.jit` with explicit `out_shardings`
   (indices sharded like their weights, per-channel / group tables like the channel
   axis, per-tensor tables replicated);
3. fine-tunes for `--steps` with the README's clustered train step (`cj.apply`,
   `jax.grad`, `cj.optimizer`, `optax.apply_updates`, `cj.update_indices`), unchanged:
   sharding comes from the inputs alone;
4. runs the same program on one device and compares (losses, params, centroids,
   indices), then writes `results.md` and `loss.png` to the output folder it prints.

Multi-host: run the same command on every host with `--distributed` (it calls
`jax.distributed.initialize()` first); each process feeds its own slice of every global
batch through `jax.make_array_from_process_local_data`. See BUILD.md.

    python examples/sharded.py                 # about a minute on 2 CPU cores
    python examples/sharded.py --steps 20 --out /tmp/sharded
"""

from __future__ import annotations

import os
import sys

# Before jax is imported: 8 fake CPU devices (ignored by GPU / TPU backends).
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:
    _FLAGS += " --xla_force_host_platform_device_count=8"
# The 8 fake devices are threads of one process: on a busy 2-core machine a collective can
# wait long for its last thread, and XLA's default timeout would abort the run.
if "xla_cpu_collective_timeout_seconds" not in _FLAGS:
    _FLAGS += (
        " --xla_cpu_collective_timeout_seconds=1800"
        " --xla_cpu_collective_call_terminate_timeout_seconds=1800"
    )
os.environ["XLA_FLAGS"] = _FLAGS.strip()

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import MLP  # noqa: E402
from _digits import load_digits_split  # noqa: E402

import clusterjax as cj  # noqa: E402

MODEL = MLP()  # 64-256-256-10, the MLP of every example


# ----------------------------------------------------------------------------- shardings


def param_specs(params):
    """Megatron-style MLP: column-parallel hidden layers, row-parallel classifier."""

    def spec(path, w):
        name = cj.path_str(path)
        if name.startswith("Dense_2"):
            return P("model", None) if w.ndim == 2 else P()
        return P(None, "model") if w.ndim == 2 else P("model")

    return jax.tree_util.tree_map_with_path(spec, params)


def state_shardings(mesh, params_shape, param_sharding, state_shape):
    """Shardings for a `ClusterState`: indices / masks like their weights, tables like the
    channel axis of their weight (per channel / group) or replicated (per tensor)."""
    is_none = lambda x: x is None  # noqa: E731
    treedef = jax.tree.structure(params_shape, is_leaf=is_none)
    ws = jax.tree.leaves(params_shape, is_leaf=is_none)
    shs = jax.tree.leaves(param_sharding, is_leaf=is_none)
    cents, idx, masks = [], [], []
    for w, sh, lp in zip(ws, shs, state_shape.plan.leaves):
        if lp is None:
            cents.append(None)
            idx.append(None)
            masks.append(None)
            continue
        if lp.axis is None:
            cents.append(NamedSharding(mesh, P()))
        else:
            parts = tuple(sh.spec) + (None,) * (w.ndim - len(sh.spec))
            cents.append(NamedSharding(mesh, P(parts[lp.axis], None)))
        idx.append(sh)
        masks.append(sh if lp.spec.preserve_sparsity else None)
    un = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
    return cj.ClusterState(un(cents), un(idx), un(masks), state_shape.plan)


def describe(tree_of_arrays):
    """{path: PartitionSpec string} of the arrays of a tree."""
    out = {}
    for path, a in jax.tree_util.tree_leaves_with_path(tree_of_arrays):
        spec = getattr(a.sharding, "spec", None)
        out[cj.path_str(path)] = "replicated" if a.sharding.is_fully_replicated else str(spec)
    return out


# ----------------------------------------------------------------------------- training


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_steps(lr_dense: float, lr_clustered: float):
    dense_tx = optax.adam(lr_dense)
    tx = cj.optimizer(optax.adam(lr_clustered))

    @jax.jit
    def dense_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: xent(MODEL.apply({"params": p}, x), y))(params)
        updates, opt_state = dense_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # The README's train step, verbatim: nothing here mentions devices or shardings.
    @jax.jit
    def train_step(params, state, opt_state, x, y):
        def loss_fn(params, centroids):
            clustered = cj.apply(params, state._replace(centroids=centroids))
            logits = MODEL.apply({"params": clustered}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, state.centroids)
        updates, opt_state = tx.update(
            grads, opt_state, (params, state.centroids), cluster_state=state
        )
        params, centroids = optax.apply_updates((params, state.centroids), updates)
        state = cj.update_indices(params, state._replace(centroids=centroids))
        return params, state, opt_state, loss

    return dense_tx, dense_step, tx, train_step


def run(args, mesh, data, progress, label):
    """The whole pipeline on `mesh` (None: one device). Returns a dict of results."""
    x_tr, y_tr, x_te, y_te = data
    rules = {
        r"Dense_[01]/kernel": make_spec(args),
        r"Dense_2/kernel": cj.ClusterSpec(num_clusters=args.clusters, init=args.init),
    }
    dense_tx, dense_step, tx, train_step = make_steps(args.lr, args.finetune_lr)
    key = jax.random.key(args.seed)
    abstract = jax.eval_shape(lambda k: MODEL.init(k, x_tr[:1])["params"], key)
    if mesh is None:
        dev = jax.devices()[0]
        p_shard = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(dev), abstract)
        x_shard = y_shard = rep = jax.sharding.SingleDeviceSharding(dev)
    else:
        p_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(abstract))
        x_shard = NamedSharding(mesh, P("data", None))
        y_shard = NamedSharding(mesh, P("data"))
        rep = NamedSharding(mesh, P())

    def global_batch(a, sharding):
        # Each process contributes its own slice of the global batch (all of it when
        # there is one process).
        n = len(a) // jax.process_count()
        local = a[jax.process_index() * n : (jax.process_index() + 1) * n]
        return jax.make_array_from_process_local_data(sharding, local, a.shape)

    params = jax.jit(lambda k: MODEL.init(k, x_tr[:1])["params"], out_shardings=p_shard)(key)
    rng = np.random.default_rng(args.seed)
    order = np.concatenate(
        [rng.permutation(len(x_tr)) for _ in range(1 + (args.pretrain_steps + args.steps) // 20)]
    )

    def batch(i):
        idx = order[i * args.batch_size : (i + 1) * args.batch_size]
        return global_batch(x_tr[idx], x_shard), global_batch(y_tr[idx], y_shard)

    opt_state = dense_tx.init(params)
    for i in tqdm(range(args.pretrain_steps), desc=f"{label} dense", disable=not progress):
        params, opt_state, _ = dense_step(params, opt_state, *batch(i))
        # One step in flight at a time: with many queued multi-device programs, XLA's CPU
        # runtime (8 fake devices on 2 cores) can deadlock in a collective.
        jax.block_until_ready(params)

    # Cluster on the mesh: jit with explicit out_shardings for the ClusterState.
    init_fn = lambda p, k: cj.init(p, rules, key=k)  # noqa: E731
    state_shape = jax.eval_shape(init_fn, params, jax.random.key(1))
    if mesh is None:
        s_shard = None
    else:
        s_shard = state_shardings(mesh, abstract, p_shard, state_shape)
    state = jax.jit(init_fn, out_shardings=s_shard)(params, jax.random.key(args.seed + 1))
    init_state = state

    opt_state = tx.init((params, state.centroids))
    losses, t_steps = [], []
    for i in tqdm(range(args.steps), desc=f"{label} clustered", disable=not progress):
        xb, yb = batch(args.pretrain_steps + i)
        t = time.perf_counter()
        params, state, opt_state, loss = train_step(params, state, opt_state, xb, yb)
        jax.block_until_ready((params, state, opt_state))  # one step in flight (see above)
        losses.append(loss)
        if i:  # the first step compiles
            t_steps.append(time.perf_counter() - t)
    dense = jax.jit(cj.strip)(params, state)
    x_ev, y_ev = global_batch(x_te, rep), global_batch(y_te, rep)
    logits = jax.jit(lambda p, x: MODEL.apply({"params": p}, x))(dense, x_ev)
    return dict(
        params=params,
        state=state,
        init_state=init_state,
        dense=dense,
        losses=[float(v) for v in losses],
        acc=float(jnp.mean(jnp.argmax(logits, -1) == y_ev)),
        step_ms=1e3 * float(np.median(t_steps)) if t_steps else float("nan"),
    )


def make_spec(args):
    if args.granularity == "group":
        return cj.ClusterSpec(
            num_clusters=args.clusters,
            init=args.init,
            granularity="group",
            group_size=args.group_size,
        )
    return cj.ClusterSpec(num_clusters=args.clusters, init=args.init, granularity=args.granularity)


def compare(a, b):
    """(max |difference| of float leaves, fraction of equal integer entries)."""
    worst, same, total = 0.0, 0, 0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        u, v = np.asarray(u), np.asarray(v)
        if np.issubdtype(u.dtype, np.floating):
            worst = max(worst, float(np.max(np.abs(u - v))) if u.size else 0.0)
        else:
            same += int(np.sum(u == v))
            total += u.size
    return worst, (same / total if total else 1.0)


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--steps", type=int, default=200, help="clustered train steps")
    p.add_argument("--pretrain-steps", type=int, default=600, help="dense train steps first")
    p.add_argument("--mesh", default="2x4", help="'data'x'model' mesh shape, e.g. 2x4 or 1x8")
    p.add_argument("--clusters", type=int, default=8, help="K")
    p.add_argument("--init", default="kmeans++", help="centroid init method")
    p.add_argument(
        "--granularity", default="channel", choices=["tensor", "channel", "group"],
        help="tables of the two hidden kernels (the classifier is per tensor)",
    )  # fmt: skip
    p.add_argument("--group-size", type=int, default=8, help="channels per table for 'group'")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="dense Adam learning rate")
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="clustered Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-reference", action="store_true", help="skip the single-device comparison run"
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host; same command on every\n"
        "host; arguments auto-detected on Cloud TPU / SLURM / Open MPI unless given below)",
    )
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (--distributed)")
    p.add_argument("--num-processes", type=int, default=None, help="(--distributed)")
    p.add_argument("--process-id", type=int, default=None, help="(--distributed)")
    p.add_argument("--out", default="examples/out/sharded", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.distributed:
        # Cross-process collectives for CPU devices (accelerators bring their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    t0 = time.perf_counter()
    progress = not args.no_progress and jax.process_index() == 0
    data_n, model_n = (int(v) for v in args.mesh.lower().split("x"))
    if data_n * model_n != jax.device_count():
        raise SystemExit(
            f"--mesh {args.mesh} needs {data_n * model_n} devices, found {jax.device_count()} "
            f"({jax.devices()[0].platform}). On CPU, XLA_FLAGS must not set a different "
            "--xla_force_host_platform_device_count."
        )
    mesh = Mesh(np.array(jax.devices()).reshape(data_n, model_n), ("data", "model"))
    data = load_digits_split(seed=0)
    sharded = run(args, mesh, data, progress, "sharded")
    ref = None
    if not args.no_reference and jax.process_count() == 1:
        ref = run(args, None, data, progress, "1 device")

    # ---- report.
    params_sh, idx_sh = describe(sharded["params"]), describe(sharded["state"].indices)
    cent_sh = describe(sharded["state"].centroids)
    rows = []
    plan = sharded["state"].plan
    for (path, w), lp in zip(jax.tree_util.tree_leaves_with_path(sharded["params"]), plan.leaves):
        name = cj.path_str(path)
        gran = "-" if lp is None else lp.spec.granularity
        rows.append(
            [name, str(tuple(w.shape)), params_sh[name], idx_sh.get(name, "-"), gran]
            + [cent_sh.get(name, "-")]
        )
    if jax.process_index() == 0:
        os.makedirs(args.out, exist_ok=True)
    cmd = " ".join(["python examples/sharded.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "## Sharded clustered training (issue #6)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Mesh {data_n} x {model_n} ('data', 'model') of {jax.device_count()} "
        f"{jax.devices()[0].platform} devices ({jax.process_count()} process(es)); global "
        f"batch {args.batch_size}; {args.pretrain_steps} dense steps, then K={args.clusters} "
        f"({args.init}, hidden kernels {args.granularity}"
        + (f" {args.group_size}" if args.granularity == "group" else "")
        + f", classifier per tensor) for {args.steps} clustered steps.",
        "",
        "| leaf | shape | param sharding | indices | tables | centroid sharding |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"Test accuracy of the stripped model (sharded run): {sharded['acc']:.4f}."]
    if ref is not None:
        d_params, _ = compare(ref["params"], sharded["params"])
        d_cent, same_idx = compare(ref["state"], sharded["state"])
        d_init, same_init = compare(ref["init_state"], sharded["init_state"])
        d_loss = max(abs(a - b) for a, b in zip(ref["losses"], sharded["losses"]))
        lines += [
            "",
            "Sharded vs one device, same program and seeds:",
            "",
            "| quantity | value |",
            "|---|---|",
            f"| max abs diff, centroids at init | {d_init:.2e} |",
            f"| indices equal at init | {same_init:.6f} |",
            f"| max abs diff, loss over {args.steps} steps | {d_loss:.2e} |",
            f"| max abs diff, final params | {d_params:.2e} |",
            f"| max abs diff, final centroids | {d_cent:.2e} |",
            f"| indices equal after training | {same_idx:.6f} |",
            f"| test accuracy, sharded / one device | {sharded['acc']:.4f} / {ref['acc']:.4f} |",
            f"| median step, sharded / one device | {sharded['step_ms']:.2f} ms / "
            f"{ref['step_ms']:.2f} ms |",
            "",
            "(Fake CPU devices share the same cores, so the sharded step is not faster here; "
            "the point is that the numbers agree.)",
        ]
    text = "\n".join(lines) + "\n"
    if jax.process_index() == 0:
        md = os.path.join(args.out, "results.md")
        with open(md, "w") as f:
            f.write(text)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(sharded["losses"], label=f"sharded {data_n}x{model_n}")
        if ref is not None:
            ax.plot(ref["losses"], "--", label="one device")
        ax.set(xlabel="clustered step", ylabel="train loss", title="clustered fine-tuning")
        ax.legend()
        fig.tight_layout()
        png = os.path.join(args.out, "loss.png")
        fig.savefig(png, dpi=110)
        plt.close(fig)
        print(text)
        print(f"wrote {md} and {png} ({time.perf_counter() - t0:.0f} s)")
        print(f"output folder: {os.path.abspath(args.out)}")
    return {"sharded": sharded, "reference": ref, "text": text}


if __name__ == "__main__":
    main()
