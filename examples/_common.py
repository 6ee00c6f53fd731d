"""Shared pieces of the examples: data, models, jitted train / eval loops, sizes, output.

Every training loop here is the README's canonical train step (linen), jitted once per
(model, optimizer settings) and reused across runs of the same shapes: a new K means
new static shapes (one compile), nothing recompiles across steps or repeated runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _digits import load_digits_split
from tqdm.auto import tqdm

import clusterjax as cj

SPLIT = "scikit-learn load_digits, train_test_split(test_size=0.25, stratify=y, random_state=0)"


# ----------------------------------------------------------------------------- data


def load_data(validation: bool = False):
    """`(x_train, y_train, x_eval, y_eval)` as (n, 8, 8, 1) images in [0, 1].

    `validation=True` trains on 80% of the training split and evaluates on the other
    20% (stratified, seed 0): that is how the default hyperparameters were chosen,
    without looking at the test set.
    """
    return load_digits_split(seed=0, images=True, validation=0.2 if validation else 0.0)


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    """64-256-256-10 with ReLU."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    """conv3x3(16) - conv3x3(32) - avgpool 2 - dense 64 - dense 10."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


MODELS = {"mlp": MLP(), "cnn": CNN()}

#: The rule every example clusters with: all kernels, chosen explicitly. (The default
#: selection would keep the CNN's 108-weight conv kernel dense at K = 32: fewer than 4 x K
#: weights.)
KERNELS = r".*kernel"


def init_params(model: nn.Module, x: np.ndarray, seed: int):
    return model.init(jax.random.key(seed), x[:1])["params"]


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ----------------------------------------------------------------------------- jitted steps


@functools.cache
def plain_step(model: nn.Module, lr: float):
    """(tx, step) for ordinary training; `masks` (or None) keeps pruned weights at zero."""
    tx = optax.adam(lr)

    @jax.jit
    def step(params, opt_state, masks, x, y):
        def loss_fn(params):
            return _xent(model.apply({"params": params}, x), y)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if masks is not None:
            params = jax.tree.map(lambda p, m: p * m, params, masks)
        return params, opt_state, loss

    return tx, step


def adam(lr: float, decay_steps: int | None = None):
    """Adam at `lr`, cosine-decayed to 0 over `decay_steps` when given."""
    if decay_steps:
        return optax.adam(optax.cosine_decay_schedule(lr, decay_steps))
    return optax.adam(lr)


@functools.cache
def clustered_step(model: nn.Module, lr: float, decay_steps: int | None = None):
    """(tx, step): the README's linen train step, verbatim, for `model`."""
    tx = cj.optimizer(adam(lr, decay_steps))

    @jax.jit
    def train_step(params, state, opt_state, x, y):
        def loss_fn(params, centroids):
            clustered = cj.apply(params, state._replace(centroids=centroids))
            logits = model.apply({"params": clustered}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, state.centroids)
        updates, opt_state = tx.update(
            grads, opt_state, (params, state.centroids), cluster_state=state
        )
        params, centroids = optax.apply_updates((params, state.centroids), updates)
        state = cj.update_indices(params, state._replace(centroids=centroids))
        return params, state, opt_state, loss

    return tx, train_step


@functools.cache
def _logits_fn(model: nn.Module):
    return jax.jit(lambda params, x: model.apply({"params": params}, x))


def accuracy(model: nn.Module, params, x, y) -> float:
    """Test accuracy of plain (e.g. stripped) params."""
    return float(jnp.mean(jnp.argmax(_logits_fn(model)(params, x), -1) == y))


# ----------------------------------------------------------------------------- loops


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (so stdout stays the table)."""
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, disable=not enabled)


def batches(rng: np.random.Generator, n: int, batch_size: int, epochs: int):
    """Index batches of a fresh permutation per epoch; the last partial batch is dropped
    so every step has the same shape (no recompiles)."""
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def _loop(step, carry, data, *, epochs, batch_size, seed, desc, bar, max_steps=None):
    x_tr, y_tr = data[0], data[1]
    rng = np.random.default_rng(seed)
    total = epochs * (len(x_tr) // batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    with progress(total, desc, bar) as pbar:
        for n, idx in enumerate(batches(rng, len(x_tr), batch_size, epochs)):
            if n == total:
                break
            *carry, loss = step(*carry, x_tr[idx], y_tr[idx])
            pbar.update(1)
            if n % 10 == 0:
                pbar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    return carry


def train_plain(
    model, params, data, *, epochs, lr=1e-3, batch_size=64, seed=0, bar=True, masks=None,
    max_steps=None, desc="train",
):  # fmt: skip
    """Ordinary Adam training; with `masks` (1 = keep) pruned weights stay zero."""
    tx, step = plain_step(model, lr)
    params, _ = _loop(
        lambda p, o, x, y: step(p, o, masks, x, y),
        (params, tx.init(params)),
        data,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        desc=desc,
        bar=bar,
        max_steps=max_steps,
    )
    return params


def train_clustered(
    model, params, state, data, *, epochs, lr=5e-4, batch_size=64, seed=0, bar=True,
    max_steps=None, desc="fine-tune", cosine=False,
):  # fmt: skip
    """Clustered fine-tuning with the README's train step; returns `(params, state)`.

    `cosine=True` decays the learning rate to 0 over the run (cosine schedule)."""
    total = epochs * (len(data[0]) // batch_size)
    if max_steps is not None:
        total = min(total, max_steps)
    tx, step = clustered_step(model, lr, total if cosine else None)
    params, state, _ = _loop(
        step,
        (params, state, tx.init((params, state.centroids))),
        data,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        desc=desc,
        bar=bar,
        max_steps=max_steps,
    )
    return params, state


def finetune(model, params, state, data, args, **train):
    """`train_clustered` with the fine-tuning flags of `add_common_args` (`--finetune-epochs`,
    `--finetune-lr`, `--constant-lr`); `train` holds the rest (batch size, seed, desc...)."""
    return train_clustered(
        model, params, state, data, epochs=args.finetune_epochs, lr=args.finetune_lr,
        cosine=not args.constant_lr, **train,
    )  # fmt: skip


# ----------------------------------------------------------------------------- sizes


def clustered_leaves(params, state):
    """[(path, stripped array)] of the clustered leaves, in tree order."""
    dense = cj.strip(params, state)
    flat = jax.tree_util.tree_flatten_with_path(dense)[0]
    cents = jax.tree.leaves(state.centroids, is_leaf=lambda c: c is None)
    return [(cj.path_str(p), np.asarray(w)) for (p, w), c in zip(flat, cents) if c is not None]


def distinct_per_kernel(params, state) -> str:
    """Distinct values of every clustered kernel after `strip`, e.g. '4/4/4'."""
    return "/".join(str(len(np.unique(w))) for _, w in clustered_leaves(params, state))


def stored_bytes(params, state) -> tuple[int, str]:
    """Bytes of the deployable model and what they measure (the one place to switch).

    With packing available: the size of the `cj.save` file (bit-packed indices, centroid
    tables, dense biases, header). Otherwise: zlib (level 9) of the stripped params.
    """
    if hasattr(cj, "pack") and hasattr(cj, "save"):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.cjx")
            cj.save(path, cj.pack(params, state))
            return os.path.getsize(path), "cj.save file"
    raw = b"".join(np.asarray(w).tobytes() for w in jax.tree.leaves(cj.strip(params, state)))
    return len(zlib.compress(raw, 9)), "zlib of stripped params"


def float32_bytes(params) -> int:
    return sum(int(np.size(w)) * 4 for w in jax.tree.leaves(params))


def sparsity(arrays) -> float:
    """Fraction of exact zeros over a list of arrays."""
    zeros = sum(int(np.sum(np.asarray(a) == 0)) for a in arrays)
    return zeros / max(sum(int(np.size(a)) for a in arrays), 1)


def kernels(params):
    """[(path, array)] of the leaves with ndim >= 2 (what clustering selects by default)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(cj.path_str(p), np.asarray(w)) for p, w in flat if np.ndim(w) >= 2]


# ----------------------------------------------------------------------------- CLI + output


def add_common_args(p: argparse.ArgumentParser, name: str, *, epochs=30, finetune_epochs=8):
    p.add_argument("--epochs", type=int, default=epochs, help="baseline training epochs")
    p.add_argument(
        "--finetune-epochs", type=int, default=finetune_epochs, help="clustered fine-tune epochs"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="baseline Adam learning rate")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="fine-tune Adam learning rate")
    p.add_argument(
        "--constant-lr",
        action="store_true",
        help="fine-tune at a constant learning rate (default: cosine decay to 0)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="cap every training loop at this many steps (smoke tests)",
    )
    p.add_argument("--seed", type=int, default=0, help="model init, batch order, cluster init")
    p.add_argument(
        "--validation",
        action="store_true",
        help="train on 80%% of the training split, report on the held-out 20%% "
        "(for choosing hyperparameters; the test set is not touched)",
    )
    p.add_argument("--out", default=f"examples/out/{name}", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def eval_name(args) -> str:
    return "validation (20% of train)" if args.validation else "test"


def out_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: str, text: str) -> str:
    path = os.path.join(out, "results.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Timer:
    """Wall and process CPU time since creation, plus the machine's load at the start
    (the examples share a 2-core machine; a loaded machine stretches the wall time)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def report(self) -> str:
        cpu = time.process_time() - self.c0
        return (
            f"Wall time: {self.seconds:.0f} s (process CPU time {cpu:.0f} s; "
            f"1-minute load average at start {self.load:.1f})."
        )
