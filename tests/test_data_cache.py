"""The training data cache is built in parts: a build killed halfway resumes without redoing the
finished parts, and a half-built cache is never taken for a complete one."""

import json
import os
import signal
import subprocess
import sys
import time

from pegjax.data import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PART_LINES = 1000


def synthetic_file(shared_data, path, lines):
    """Real STS-B triples repeated with varied queries, ``lines`` lines."""
    with open(shared_data / "stsb_zh_triples" / "bge_finetune_data.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with open(path, "w", encoding="utf-8") as out:
        for i in range(lines):
            row = rows[i % len(rows)]
            out.write(json.dumps(dict(row, query=f"{row['query']} #{i}"), ensure_ascii=False) + "\n")
    return path


def records(files):
    import grain

    from pegjax.data.tfds_format import Codec

    source, codec = grain.sources.ArrayRecordDataSource(files), Codec()
    return [codec.decode(source[i])["query"] for i in range(len(source))]


def test_a_build_killed_halfway_resumes_at_its_first_unfinished_part(shared_data, tmp_path, monkeypatch):
    data = synthetic_file(shared_data, tmp_path / "train.jsonl", 20_000)
    cache = tmp_path / "cache"
    build = (f"from pegjax.data import training; "
             f"training.build_cache([{str(data)!r}], {str(cache)!r}, 'error', part_lines={PART_LINES})")
    process = subprocess.Popen([sys.executable, "-c", build], cwd=REPO)
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and process.poll() is None and len(finished) < 5:
        building = [d for d in os.listdir(cache) if d.endswith(".building")] if cache.exists() else []
        finished = [f for f in os.listdir(cache / building[0]) if f.endswith(".json")] if building else []
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 5 <= len(finished) < 20, "the build finished before it could be killed"
    assert not any(os.path.isfile(cache / d / "stats.json") for d in os.listdir(cache))  # nothing looks complete

    written = []
    write_part = training._write_part
    monkeypatch.setattr(training, "_write_part", lambda read, building, number, *rest: (
        written.append(number), write_part(read, building, number, *rest))[1])
    files, stats = training.build_cache([str(data)], str(cache), "error", part_lines=PART_LINES)
    assert written and min(written) >= len(finished) and max(written) == 19  # only the unfinished parts
    assert stats["lines"] == stats["records"] == 20_000 and len(files) == 20
    assert not any(name.endswith(".building") for name in os.listdir(cache))
    assert records(files) == [f"{q} #{i}" for i, q in enumerate(_queries(shared_data, 20_000))]


def _queries(shared_data, count):
    with open(shared_data / "stsb_zh_triples" / "bge_finetune_data.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line)["query"] for line in f]
    return [rows[i % len(rows)] for i in range(count)]
