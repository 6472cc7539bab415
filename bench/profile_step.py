"""Where the time goes: one real training step (or encode call, or search) traced, each compiled op's
time attributed to a kind.

    python -m bench.profile_step [--data scifact] [--queries 16] [--mini-batch 32] [--top 20]
                                 [--dtype float32] [--keep-dense-outputs]
    python -m bench.profile_step --what encode [--rows 32] [--passage-length 256] [--dtype float32]
    python -m bench.profile_step --what search [--corpus 100000] [--queries 1000]

``--what step`` (the default) builds the pegjax side of `bench.train_step` (the same real batch,
packing, mesh and StepConfig), runs it twice warm, then traces one step with ``jax.profiler``.
``--what encode`` traces one `pegjax.encode.Encoder` call on ``--rows`` real SciFact abstracts
padded to ``--passage-length`` tokens (all-MiniLM-L6-v2); ``--what search`` one
`pegjax.search.Index` search of ``--queries`` random unit vectors against ``--corpus`` (k = 100,
384 dimensions, as `bench.search`). Every op the CPU runtime executed is looked up in the compiled
HLO (``lower().compile()``) and sorted into one kind:

- dense products: fusions around a 2-D dot (the projections, the FFN, their weight gradients; the
  search's scores);
- attention products: fusions around a batched dot over heads, with whatever softmax work XLA
  fused into them;
- dropout masks: the integer hash of `pegjax.models.bert.dropout` (xor and shifts) with no dot;
- layout copies: copies, transposes and slices, nothing computed;
- collectives: all-gathers, all-reduces, reduce-scatters;
- other elementwise: LayerNorm, GELU, softmax backward, residual adds, the loss, top-k.

A loop's own span (``while``) holds its body's ops, which are traced one by one, so it is left out.

Prints the CPU model, the wall time of the traced call, each kind's op time (summed over devices,
so it is about devices x wall), share, count and GFLOP/s (2 x output x contraction of every dot
it holds), then the most expensive ops with their shapes. Op time is the CPU runtime's own per-op
span: what the ops cost, not what the Python loop waits on.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
LAYOUT = {"copy", "transpose", "bitcast", "slice", "reshape", "broadcast", "parameter", "constant", "concatenate",
          "dynamic-slice", "dynamic-update-slice", "pad", "tuple", "get-tuple-element", "iota"}
# Ops whose traced span holds other traced ops (a loop's body, a called computation): counting them
# would count their body twice.
CONTROL_FLOW = {"while", "conditional", "call"}
KINDS = ("dense products", "attention products", "dropout masks", "layout copies", "collectives", "other elementwise")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


@dataclasses.dataclass(frozen=True)
class Op:
    """One executable op of a compiled module: what it is and what its dots compute."""
    kind: str
    flops: float
    describe: str


def _dims(shape: str) -> list[int]:
    """'f32[16,12,256]{2,1,0}' -> [16, 12, 256]; a scalar -> []."""
    found = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in found.group(1).split(",") if d] if found else []


def computations(hlo_text: str) -> dict[str, dict[str, tuple[str, str, str]]]:
    """Compiled HLO text -> {computation: {instruction: (shape, opcode, operands and attributes)}}."""
    out, current = {}, None
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            found = _COMPUTATION.match(line)
            current = found.group(1) if found and line.rstrip().endswith("{") else None
            if current:
                out[current] = {}
            continue
        found = _INSTRUCTION.match(line)
        if current and found:
            out[current][found.group(1)] = (found.group(2), found.group(3), found.group(4))
    return out


def _operands(rest: str) -> list[str]:
    """The operand names of an instruction, from the text after its opcode's parenthesis."""
    return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])


def _dot_flops(body: dict, shape: str, rest: str) -> float:
    """2 x output elements x contracted size of one dot instruction."""
    lhs = _operands(rest)[0]
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
    lhs_dims = _dims(body[lhs][0])
    contracted = math.prod(lhs_dims[int(d)] for d in contracting.split(",") if d)
    return 2.0 * math.prod(_dims(shape)) * contracted


def op_table(hlo_text: str) -> dict[str, Op]:
    """Every instruction of a compiled module -> its `Op` (kind, dot FLOPs, a one-line description)."""
    comps = computations(hlo_text)
    # A fusion's body never runs as an op of its own: only the fusion instruction is traced.
    fused = {re.search(r"calls=%([\w.\-]+)", rest).group(1)
             for body in comps.values() for _, opcode, rest in body.values() if opcode == "fusion" and "calls=%" in rest}
    table = {}
    for computation, body in comps.items():
        if computation in fused:
            continue
        for name, (shape, opcode, rest) in body.items():
            inner, inner_body = {opcode}, {name: (shape, opcode, rest)}
            called = re.search(r"calls=%([\w.\-]+)", rest)
            if opcode == "fusion" and called and called.group(1) in comps:
                inner_body = comps[called.group(1)]
                inner = {op for _, op, _ in inner_body.values()}
            scope = inner_body if opcode == "fusion" else body
            dots = [(s, r) for s, op, r in inner_body.values() if op == "dot"]
            flops = sum(_dot_flops(scope, s, r) for s, r in dots)
            if opcode in CONTROL_FLOW:
                kind = "control flow"
            elif any(opcode.startswith(c) for c in COLLECTIVES):
                kind = "collectives"
            elif dots:
                kind = "attention products" if any(len(_dims(s)) > 2 for s, _ in dots) else "dense products"
            elif {"xor", "shift-right-logical"} <= inner:
                kind = "dropout masks"
            elif inner <= LAYOUT | {"fusion"}:
                kind = "layout copies"
            else:
                kind = "other elementwise"
            ops = ",".join(sorted(inner - LAYOUT - {"dot", "fusion"}))
            dot_shapes = "; ".join(" x ".join(_short(scope[o][0]) for o in _operands(r)) for _, r in dots)
            table[name] = Op(kind, flops, f"{_short(shape)}" + (f" <- dot {dot_shapes}" if dots else "") + (f" + {ops}" if ops else ""))
    return table


def _short(shape: str) -> str:
    return re.sub(r"\{[^}]*\}", "", shape)


def module_name(hlo_text: str) -> str:
    return re.match(r"HloModule ([\w.\-]+)", hlo_text).group(1)


def traced_op_seconds(trace_dir: str, module: str) -> tuple[collections.Counter, collections.Counter]:
    """The ops of ``module`` in a ``jax.profiler`` trace: ({op: seconds summed over devices}, {op: count})."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}: was the trace written with "
                                "create_perfetto_trace=True?")
    seconds, counts = collections.Counter(), collections.Counter()
    for path in files:
        with gzip.open(path) as f:
            trace = json.load(f)
        for event in trace["traceEvents"] if isinstance(trace, dict) else trace:
            args = event.get("args") or {}
            if event.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
                seconds[args["hlo_op"]] += event["dur"] * 1e-6
                counts[args["hlo_op"]] += 1
    return seconds, counts


def profile(call, hlo_text: str, trace_dir: str | None = None) -> dict:
    """Runs ``call()`` once under ``jax.profiler`` and attributes its module's op time by kind.

    ``hlo_text``: the compiled text of the module ``call`` runs. Returns {"wall": seconds, "kinds":
    {kind: (seconds, share, count, flops)}, "ops": [(seconds, count, kind, description)], the ops
    that share a description summed, most expensive first,
    "named": the share of the traced op time whose op the text names}."""
    import jax

    table = op_table(hlo_text)
    with tempfile.TemporaryDirectory() as scratch:
        trace_dir = trace_dir or scratch
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            call()
            wall = time.perf_counter() - start
        seconds, counts = traced_op_seconds(trace_dir, module_name(hlo_text))
    for op in [op for op in seconds if op in table and table[op].kind == "control flow"]:
        del seconds[op], counts[op]  # their bodies' ops are traced on their own
    total = sum(seconds.values())
    named = sum(s for op, s in seconds.items() if op in table)
    kinds = {kind: [0.0, 0.0, 0, 0.0] for kind in KINDS}
    for op, s in seconds.items():
        if op in table:
            row = kinds[table[op].kind]
            row[0] += s
            row[2] += counts[op]
            row[3] += table[op].flops * counts[op]
    for row in kinds.values():
        row[1] = row[0] / total if total else 0.0
    # Ops that share a description (the same layer's op in every chunk and pass) are one line.
    grouped = collections.defaultdict(lambda: [0.0, 0])
    for op, s in seconds.items():
        if op in table:
            key = (table[op].kind, table[op].describe)
            grouped[key][0] += s
            grouped[key][1] += counts[op]
    ops = sorted(((s, n, kind, describe) for (kind, describe), (s, n) in grouped.items()), reverse=True)
    return {"wall": wall, "total": total, "named": named / total if total else 0.0,
            "kinds": {k: tuple(v) for k, v in kinds.items()}, "ops": ops}


def report(result: dict, top: int) -> list[str]:
    lines = [f"wall time {result['wall']:.2f} s; op time {result['total']:.2f} s summed over devices "
             f"({result['named']:.1%} of it named in the compiled HLO)",
             f"  {'kind':<20} {'op time':>9} {'share':>6} {'ops':>6} {'GFLOP/s':>8}"]
    for kind, (s, share, n, flops) in result["kinds"].items():
        rate = f"{flops / s / 1e9:8.0f}" if flops and s else f"{'':>8}"
        lines.append(f"  {kind:<20} {s:8.2f}s {share:6.1%} {n:6d} {rate}")
    lines.append(f"  the {top} most expensive kinds of op (the same op of every layer, chunk and pass together):")
    for s, n, kind, describe in result["ops"][:top]:
        lines.append(f"  {s:7.2f} s {s / result['total']:6.1%} x{n:<5d} {kind:<19} {describe[:150]}")
    return lines


def _step(args):
    from bench.train_step import DATA, HARD_NEGATIVES, pegjax_step

    queries, groups, sample = DATA[args.data](args.queries)
    run = pegjax_step(queries, groups, sample, args, args.dtype, keep_dense_outputs=args.keep_dense_outputs)
    run()
    run()
    about = (f"{args.data}: {args.queries} queries x {1 + HARD_NEGATIVES} passages, lengths {args.query_length}/"
             f"{args.passage_length}, mini-batch {args.mini_batch}, dropout 0.1, {args.dtype}"
             + (", dense outputs kept" if args.keep_dense_outputs else ""))
    return run, run.lower().compile().as_text(), about


def _encode(args):
    import jax

    from bench.common import minilm_path, scifact_texts
    from pegjax.data.tokenizer import pad_batch, tokenize
    from pegjax.encode import Encoder

    encoder = Encoder.from_pretrained(minilm_path(), dtype=args.dtype)
    texts = scifact_texts(args.rows)
    ids, mask = pad_batch(tokenize(encoder.tokenizer, texts, args.passage_length), args.passage_length, len(texts))
    ids, mask = jax.device_put((ids, mask), encoder._rows)

    def run():
        jax.block_until_ready(encoder._embed(encoder.params, ids, mask))

    run()
    run()
    about = f"encode: {len(texts)} SciFact abstracts padded to {args.passage_length} tokens, all-MiniLM-L6-v2, {args.dtype}"
    return run, encoder._embed.lower(encoder.params, ids, mask).compile().as_text(), about


def _search(args):
    import numpy as np

    from pegjax import search

    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((args.corpus, 384), dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = rng.standard_normal((args.queries, 384), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = search.Index(corpus)

    def run():
        index.search(queries, 100)

    run()
    run()
    text = index.lower(queries, 100).compile().as_text()
    return run, text, f"search: {args.queries} queries x {args.corpus:,} rows x 384, k = 100, float32"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", default="step", choices=("step", "encode", "search"))
    parser.add_argument("--data", default="scifact", choices=("scifact", "medical_zh"))
    parser.add_argument("--queries", type=int, default=None, help="step: 16 queries; search: 1,000")
    parser.add_argument("--mini-batch", type=int, default=32)
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--passage-length", type=int, default=256)
    parser.add_argument("--rows", type=int, default=32, help="encode: texts in the call")
    parser.add_argument("--corpus", type=int, default=100_000, help="search: corpus rows")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--keep-dense-outputs", action="store_true")
    parser.add_argument("--trace-dir", default=None, help="keep the trace here (TensorBoard / Perfetto)")
    args = parser.parse_args()
    args.queries = args.queries or (1000 if args.what == "search" else 16)
    from pegjax.distributed import use_cpu_cores

    use_cpu_cores()
    import jax

    from bench.common import cpu_model

    run, hlo_text, about = {"step": _step, "encode": _encode, "search": _search}[args.what](args)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {jax.device_count()} CPU devices")
    print(about)
    print("\n".join(report(profile(run, hlo_text, args.trace_dir), args.top)))


if __name__ == "__main__":
    main()
