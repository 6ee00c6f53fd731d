"""Bit-packing, `PackedArray` and `pack`/`unpack` against independent NumPy references.

States are mostly built by hand from the data-layout contract in BUILD.md (random
centroids and indices, any K), so the properties cover K = 256 on tiny leaves without
paying for centroid init; one test uses `cj.init` end to end.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import hand_state, outlier_reference

import clusterjax as cj
from clusterjax._src.packing import (
    _unpack_bits_jnp,
    is_packed,
    pack_bits,
    packed_nbytes,
    unpack_bits,
)
from clusterjax._src.plan import num_outliers
from clusterjax._src.spec import index_dtype

# ---------------------------------------------------------------------------------------
# Hand-built states (shared with test_fileformat.py and test_summary.py).

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def make_leaf(
    rng,
    shape,
    dtype,
    k,
    granularity="tensor",
    axis=-1,
    group_size=None,
    sparse=False,
    outliers=0.0,
):
    """A weight and its state entries, following BUILD.md's data layout by hand.

    (With `outliers`, `make_case` draws their positions.)
    """
    w = rng.normal(size=shape).astype(np.float32)
    if sparse:
        w[rng.random(shape) < 0.3] = 0.0
    w = np.asarray(w, jnp.dtype(dtype))
    spec = cj.ClusterSpec(
        num_clusters=k,
        granularity=granularity,
        channel_axis=axis,
        group_size=group_size,
        preserve_sparsity=sparse,
        outliers=outliers,
    )
    groups = 1 if granularity == "tensor" else shape[axis] // (group_size or 1)
    table_dtype = np.float64 if w.dtype == np.float64 else np.float32
    table = rng.normal(size=(groups, k)).astype(table_dtype)
    idx = rng.integers(0, k, size=shape)
    mask = None
    if sparse:
        table[:, 0] = 0.0
        mask = w != 0
        idx = np.where(mask, rng.integers(1, k, size=shape), 0)
    table = table[0] if granularity == "tensor" else table
    return w, table, idx.astype(index_dtype(k)), mask, spec


def make_case(rng, leaves):
    """`leaves`: {name: kwargs for make_leaf, or an array for a dense leaf}.

    Leaves with `outliers` get sorted random int32 positions (some weights there are
    scaled far out, a few beyond float16's range, which the stored values clip).
    """
    params, cents, idxs, masks, specs, outs = {}, {}, {}, {}, {}, {}
    for name, cfg in leaves.items():
        o = None
        if isinstance(cfg, dict):
            w, c, i, m, s = make_leaf(rng, **cfg)
            count = num_outliers(s.outliers, w.size)
            if count:
                o = np.sort(rng.choice(w.size, count, replace=False)).astype(np.int32)
                flat = w.reshape(-1).copy()
                scales = [1.0, 50.0] + ([1e5] if flat.dtype != np.float16 else [])
                flat[o] = (flat[o].astype(np.float32) * rng.choice(scales, count)).astype(
                    flat.dtype
                )
                w = flat.reshape(w.shape)
        else:
            w, c, i, m, s = cfg, None, None, None, None
        params[name], cents[name], idxs[name], masks[name], specs[name] = w, c, i, m, s
        outs[name] = o
    return params, hand_state(params, cents, idxs, masks, specs, outs)


def reference_strip(w, table, idx, spec, outliers=None):
    """NumPy `table[group][index]` cast to the leaf dtype: the layout contract, directly;
    the outliers' positions hold `outlier_reference` of the weight."""
    w, table, idx = np.asarray(w), np.asarray(table), np.asarray(idx)
    if spec.granularity == "tensor":
        values = table[idx.astype(np.int64)]
    else:
        axis = spec.channel_axis % w.ndim
        gs = spec.group_size if spec.granularity == "group" else 1
        group = (np.arange(w.shape[axis]) // gs).reshape(
            [-1 if d == axis else 1 for d in range(w.ndim)]
        )
        values = table[np.broadcast_to(group, w.shape), idx.astype(np.int64)]
    out = values.astype(w.dtype)
    if outliers is not None:
        flat = out.reshape(-1)
        flat[np.asarray(outliers)] = outlier_reference(w, outliers)
        out = flat.reshape(w.shape)
    return out


def bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@st.composite
def cases(draw, ks=(2, 3, 16, 17, 256), dtypes=("float32", "bfloat16")):
    """A random params tree with clustered and dense leaves plus a hand-built state."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    leaves = {}
    for n in range(draw(st.integers(1, 3))):
        ndim = draw(st.integers(1, 3))
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
        granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
        axis = draw(st.integers(-ndim, ndim - 1))
        group_size = None
        if granularity == "group":
            c = shape[axis]
            group_size = draw(st.sampled_from([d for d in range(1, c + 1) if c % d == 0]))
        leaves[f"w{n}"] = dict(
            shape=shape,
            dtype=draw(st.sampled_from(dtypes)),
            k=draw(st.sampled_from(ks)),
            granularity=granularity,
            axis=axis,
            group_size=group_size,
            sparse=draw(st.booleans()),
            outliers=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        )
    if draw(st.booleans()):
        leaves["bias"] = rng.normal(size=draw(st.integers(0, 4))).astype(np.float32)
    if draw(st.booleans()):
        leaves["step"] = np.array(draw(st.integers(0, 1000)), np.int32)
    params, state = make_case(rng, leaves)

    def nest(field):
        field = dict(field)
        return {"nested": field, "top": field.pop("w0")}

    fields = [
        nest(f) for f in (state.centroids, state.indices, state.masks, state.specs, state.outliers)
    ]
    nested = nest(params)
    return nested, hand_state(nested, *fields)


def reference_tree(params, state):
    """`{path: reference dense array}` for every leaf (dense leaves as they are)."""
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, w in flat:
        name = cj.path_str(path)
        node = [state.centroids, state.indices, state.specs, state.outliers]
        for key in path:
            node = [n[key.key] for n in node]
        c, i, s, o = node
        out[name] = np.asarray(w) if c is None else reference_strip(np.asarray(w), c, i, s, o)
    return out


# ---------------------------------------------------------------------------------------
# Bit streams.


def bitplane_reference(values, bits):
    """Stream bit j*bits + b = bit b of value j, LSB first (np.packbits, little)."""
    v = np.asarray(values, np.uint64).reshape(-1)
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


@settings(max_examples=300)
@given(bits=st.integers(1, 32), n=st.integers(0, 200), seed=st.integers(0, 2**32 - 1))
def test_bits_match_the_bitplane_reference(bits, n, seed):
    values = np.random.default_rng(seed).integers(0, 2**bits, size=n, dtype=np.uint64)
    stream = pack_bits(values, bits)
    assert stream.dtype == np.uint8 and stream.shape == (packed_nbytes(n, bits),)
    np.testing.assert_array_equal(stream, bitplane_reference(values, bits))
    back = unpack_bits(stream, bits, n)
    assert back.dtype == (np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)
    np.testing.assert_array_equal(back, values)


def test_bit_order_is_little_endian_lsb_first():
    # Three 2-bit values 1, 2, 3 -> stream bits 1,0 | 0,1 | 1,1 -> byte 0b00111001 = 57.
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 3]), 2), [57])
    # 5-bit values: 17 = 10001b, 3 = 00011b -> bits 0-4 = 10001, bits 5-9 = 00011
    # -> byte 0 = 0b011_10001 = 113, byte 1 = 0b000000_00 = 0.
    np.testing.assert_array_equal(pack_bits(np.array([17, 3]), 5), [113, 0])
    # 16 bits: plain little-endian uint16; 8 bits: the bytes themselves.
    np.testing.assert_array_equal(pack_bits(np.array([0x1234]), 16), [0x34, 0x12])
    np.testing.assert_array_equal(pack_bits(np.array([7, 255]), 8), [7, 255])
    # Unused high bits of the last byte are zero.
    assert pack_bits(np.array([1]), 3).tolist() == [1]


def test_bits_across_block_boundaries():
    # More than one 4M-value NumPy block, and a count that is not a multiple of 8.
    n = (1 << 22) + 13
    values = np.random.default_rng(0).integers(0, 32, size=n).astype(np.uint8)
    stream = pack_bits(values, 5)
    assert stream.size == math.ceil(n * 5 / 8)
    np.testing.assert_array_equal(unpack_bits(stream, 5, n), values)
    np.testing.assert_array_equal(stream[:4000], bitplane_reference(values[:6400], 5))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 24])
def test_jax_unpack_matches_numpy_under_jit(bits):
    n = 1001
    values = np.random.default_rng(bits).integers(0, 2**bits, size=n)
    stream = pack_bits(values, bits)
    out = jax.jit(_unpack_bits_jnp, static_argnums=(1, 2))(stream, bits, n)
    np.testing.assert_array_equal(np.asarray(out), values)


@pytest.mark.parametrize(
    "values, bits, fragment",
    [
        (np.array([4]), 2, r"\[0, 4\)"),
        (np.array([-1]), 3, "must lie in"),
        (np.array([0.5]), 3, "integers"),
        (np.array([1]), 0, "bits"),
        (np.array([1]), 33, "bits"),
    ],
)
def test_pack_bits_rejects_bad_values(values, bits, fragment):
    with pytest.raises(ValueError, match=fragment):
        pack_bits(values, bits)


def test_unpack_bits_rejects_short_streams():
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(np.zeros(1, np.uint8), 5, 3)


# ---------------------------------------------------------------------------------------
# pack / unpack / PackedArray.


@settings(max_examples=40)
@given(case=cases())
def test_pack_unpack_equals_strip_and_reference(case):
    params, state = case
    packed = cj.pack(params, state)
    dense = cj.strip(params, state)
    unpacked = cj.unpack(packed)
    reference = reference_tree(params, state)
    for path, leaf in jax.tree_util.tree_flatten_with_path(packed, is_leaf=is_packed)[0]:
        name = cj.path_str(path)
        node = [unpacked, dense, state.indices, state.centroids]
        for key in path:
            node = [n[key.key] for n in node]
        got, want, idx, table = node
        assert bits_equal(got, want), name  # bit for bit, dtype kept
        assert bits_equal(got, reference[name]), name
        if isinstance(leaf, cj.PackedArray):
            assert leaf.packed.nbytes == math.ceil(idx.size * leaf.bits / 8)
            assert leaf.bits == max(1, math.ceil(math.log2(leaf.num_clusters)))
            assert bits_equal(leaf.indices(), idx)
            assert bits_equal(leaf.tables, table)
            assert bits_equal(leaf.dequantize(), want)


def test_pack_of_a_real_init_equals_strip():
    params = {
        "conv": jax.random.normal(jax.random.key(0), (3, 3, 4, 8), jnp.bfloat16),
        "bias": jnp.ones(8),
    }
    spec = cj.ClusterSpec(num_clusters=17, init="linear", granularity="channel")
    # 17 tables of 8 channels cost more than the bf16 weights: only an explicit rule
    # clusters such a leaf.
    state = cj.init(params, {"conv": spec}, key=jax.random.key(2))
    packed = cj.pack(params, state)
    assert isinstance(packed["bias"], jax.Array)
    assert packed["conv"].bits == 5 and packed["conv"].tables.shape == (8, 17)
    assert packed["conv"].channel_axis == 3 and packed["conv"].dtype == "bfloat16"
    dense = cj.strip(params, state)
    assert bits_equal(cj.unpack(packed)["conv"], dense["conv"])
    w, c, i = params["conv"], state.centroids["conv"], state.indices["conv"]
    assert bits_equal(dense["conv"], reference_strip(np.asarray(w), np.asarray(c), i, spec))


def _one_packed(k=16, shape=(6, 4), granularity="tensor", dtype="float32"):
    rng = np.random.default_rng(0)
    axis, gs = (-1, None) if granularity != "group" else (-1, 2)
    params, state = make_case(
        rng,
        {"w": dict(shape=shape, dtype=dtype, k=k, granularity=granularity, axis=axis,
                   group_size=gs)},
    )  # fmt: skip
    return params, state, cj.pack(params, state)["w"]


def test_packed_array_is_a_pytree_with_static_metadata():
    params, state, p = _one_packed(granularity="channel", dtype="bfloat16")
    leaves, treedef = jax.tree.flatten(p)
    assert [x.dtype for x in leaves] == [np.uint8, np.float32]  # packed bytes, tables
    paths = [cj.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path({"w": p})[0]]
    assert paths == ["w/packed", "w/tables"]
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.shape == p.shape and rebuilt.channel_axis == 1
    expand = jax.jit(lambda q: q.unpack())
    assert bits_equal(expand(p), cj.strip(params, state)["w"])
    on_device = jax.device_put(p)
    assert isinstance(on_device, cj.PackedArray)
    assert bits_equal(expand(on_device), cj.strip(params, state)["w"])


def test_packed_array_repr_and_sizes():
    _, _, p = _one_packed(k=17)
    assert p.bits == 5 and p.size == 24 and p.ndim == 2
    assert p.nbytes == 15 + 17 * 4
    assert repr(p) == (
        "PackedArray(shape=(6, 4), dtype=float32, num_clusters=17, bits=5, "
        "granularity='tensor', nbytes=83)"
    )


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"tables": np.zeros(15, np.float32)}, r"tables have shape \(15,\)"),
        ({"tables": np.zeros(16, np.int32)}, "tables must be floating"),
        ({"packed": np.zeros(11, np.uint8)}, r"packed must be uint8 of shape \(12,\)"),
        ({"packed": np.zeros(12, np.int8)}, "packed must be uint8"),
        ({"num_clusters": 0}, "num_clusters"),
        ({"dtype": "int32"}, "dtype must be floating"),
        ({"granularity": "row"}, "granularity must be one of"),
        ({"channel_axis": 1}, "'tensor' needs channel_axis=None"),
        ({"granularity": "channel", "channel_axis": 2}, "channel_axis must be normalized"),
        ({"granularity": "group", "channel_axis": 1, "group_size": 3}, "must divide"),
    ],
)
def test_packed_array_checks_its_invariants(change, fragment):
    _, _, p = _one_packed()
    fields = dict(
        packed=p.packed, tables=p.tables, shape=p.shape, dtype=p.dtype,
        num_clusters=p.num_clusters, granularity=p.granularity,
        channel_axis=p.channel_axis, group_size=p.group_size,
    )  # fmt: skip
    fields.update(change)
    with pytest.raises(ValueError, match=fragment):
        cj.PackedArray(**fields)


def test_pack_rejects_states_that_could_not_be_loaded():
    params, state, _ = _one_packed(k=3)
    bad = state._replace(indices={"w": np.full((6, 4), 3, np.uint8)})
    with pytest.raises(ValueError, match=r"'w' holds values in \[3, 3\], outside \[0, 3\)"):
        cj.pack(params, bad)
    table = np.array([0.0, np.nan, 1.0], np.float32)
    with pytest.raises(ValueError, match="'w' holds NaN/Inf"):
        cj.pack(params, state._replace(centroids={"w": table}))
    with pytest.raises(ValueError, match="state.centroids does not match params"):
        cj.pack({"v": params["w"]}, state)
