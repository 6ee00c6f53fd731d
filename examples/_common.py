"""Shared pieces of the examples: the digits split, the models, jitted train/eval loops."""

from __future__ import annotations

import os
import sys
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import clusterjax as cj


def load_digits_split(seed: int = 0):
    """scikit-learn's bundled digits (1797 8x8 images), stratified 75/25 split.

    Returns `(x_train, y_train, x_test, y_test)`: float32 inputs scaled to [0, 1] with
    shape (n, 8, 8, 1), int32 labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    return x_tr, y_tr, x_te, y_te


class MLP(nn.Module):
    """64-256-256-10."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    """Two 3x3 convolutions and a dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


MODELS = {"mlp": MLP, "cnn": CNN}


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batches(rng: np.random.Generator, n: int, batch_size: int, epochs: int):
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def progress(total: int, desc: str, enabled: bool = True):
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, disable=not enabled)


def train_plain(model, params, data, *, epochs, lr=1e-3, batch_size=64, seed=0, bar=True):
    """Ordinary (unclustered) training with Adam; returns params."""
    x_tr, y_tr = data[0], data[1]
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _xent(model.apply({"params": p}, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    steps = epochs * (len(x_tr) // batch_size)
    with progress(steps, "train", bar) as pbar:
        for idx in batches(rng, len(x_tr), batch_size, epochs):
            params, opt_state, loss = step(params, opt_state, x_tr[idx], y_tr[idx])
            pbar.update(1)
            pbar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    return params


def train_clustered(
    model,
    params,
    state,
    data,
    *,
    epochs,
    lr=5e-4,
    batch_size=64,
    seed=0,
    bar=True,
    weight_decay=0.0,
):
    """The README's canonical clustered train step; returns (params, state)."""
    x_tr, y_tr = data[0], data[1]
    inner = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
    tx = cj.optimizer(inner)
    opt_state = tx.init((params, state))

    @jax.jit
    def step(params, state, opt_state, x, y):
        def loss_fn(params, state):
            return _xent(model.apply({"params": cj.apply(params, state)}, x), y)

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1), allow_int=True)(params, state)
        updates, opt_state = tx.update(grads, opt_state, (params, state))
        params, state = optax.apply_updates((params, state), updates)
        return params, state, opt_state, loss

    rng = np.random.default_rng(seed)
    steps = epochs * (len(x_tr) // batch_size)
    with progress(steps, "fine-tune", bar) as pbar:
        for idx in batches(rng, len(x_tr), batch_size, epochs):
            params, state, opt_state, loss = step(params, state, opt_state, x_tr[idx], y_tr[idx])
            pbar.update(1)
            pbar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    return params, state


def accuracy(model, params, x, y) -> float:
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def kernel_stats(params, state):
    """(max distinct values per clustered kernel, clustered weights, clustered leaves)."""
    dense = cj.strip(params, state)
    distinct, count = 0, 0
    for c, w in zip(
        jax.tree.leaves(state.centroids, is_leaf=lambda x: x is None), jax.tree.leaves(dense)
    ):
        if c is None:
            continue
        distinct = max(distinct, len(np.unique(np.asarray(w))))
        count += int(np.size(w))
    return distinct, count


def packed_bytes(params, state) -> tuple[int, str]:
    """Bytes of the packed model: `cj.pack` + `cj.save` when available, else zlib."""
    if hasattr(cj, "save") and hasattr(cj, "pack"):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.cjx")
            cj.save(path, cj.pack(params, state))
            return os.path.getsize(path), "packed file"
    dense = cj.strip(params, state)
    raw = b"".join(np.asarray(w).tobytes() for w in jax.tree.leaves(dense))
    return len(zlib.compress(raw, 9)), "zlib of stripped params"


def float_bytes(params) -> int:
    return sum(int(np.size(w)) * 4 for w in jax.tree.leaves(params))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def out_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
