"""Retrieval evaluation data: corpus, queries and qrels, read and checked line by line.

Two layouts on disk:

* BEIR: ``corpus.jsonl`` ({"_id", "title", "text"}), ``queries.jsonl`` ({"_id", "text"}),
  ``qrels/<split>.tsv`` (header ``query-id  corpus-id  score``).
* C-MTEB (the Hugging Face datasets ``C-MTEB/<Task>`` and ``C-MTEB/<Task>-qrels`` as downloaded):
  ``corpus``/``queries`` parquet or jsonl files with ``id``, ``text`` columns, and a qrels file for
  the split (``dev*.parquet`` or ``.jsonl``) with ``qid``, ``pid``, ``score``; the qrels may sit in
  the task folder or in a sibling ``<Task>-qrels`` folder.

A malformed line is an error naming file and line. Qrels naming a document absent from the corpus
are kept (they stay relevant and unretrievable, as trec_eval counts them) and counted; qrels naming
a query absent from the queries file are dropped and counted; both counts are reported.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

from pegjax.data.jsonl import DataError, objects, titled_text


@dataclasses.dataclass
class RetrievalData:
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    warnings: dict[str, int] = dataclasses.field(default_factory=dict)


def _read_jsonl(path: str, id_keys: tuple[str, ...], with_title: bool):
    ids, texts = [], []
    for where, row in objects(path):
        key = next((k for k in id_keys if k in row), None)
        if key is None:
            raise DataError(f"{where}: missing id field ({' or '.join(id_keys)})")
        ids.append(str(row[key]))
        texts.append(titled_text(row, where, with_title))
    return ids, texts


def read_qrels_tsv(path: str) -> list[tuple[str, str, int]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if number == 1 and parts[:2] == ["query-id", "corpus-id"]:
                continue
            if len(parts) == 4:  # TREC qrels: qid 0 docid rel
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise DataError(f"{path}:{number}: expected 3 tab-separated fields (query-id, corpus-id, score)")
            try:
                score = int(float(parts[2]))
            except ValueError:
                raise DataError(f"{path}:{number}: score {parts[2]!r} is not a number") from None
            rows.append((parts[0], parts[1], score))
    return rows


def _read_table(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        rows = []
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        return rows


def _find(folder: str, patterns: list[str]) -> list[str]:
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(folder, "**", pattern), recursive=True))
        if found:
            return found
    return []


def _assemble(corpus_ids, corpus_texts, query_ids, query_texts, qrel_rows, source) -> RetrievalData:
    for kind, ids in (("corpus", corpus_ids), ("queries", query_ids)):
        if len(set(ids)) != len(ids):
            raise DataError(f"{source}: duplicate ids in the {kind}")
    known_docs, known_queries = set(corpus_ids), set(query_ids)
    qrels: dict[str, dict[str, int]] = {}
    warnings = {"qrels_unknown_document": 0, "qrels_unknown_query": 0}
    for query_id, doc_id, score in qrel_rows:
        if query_id not in known_queries:
            warnings["qrels_unknown_query"] += 1
            continue
        if doc_id not in known_docs:
            warnings["qrels_unknown_document"] += 1
        qrels.setdefault(query_id, {})[doc_id] = score
    keep = [i for i, q in enumerate(query_ids) if q in qrels]
    return RetrievalData(
        corpus_ids=list(corpus_ids),
        corpus_texts=list(corpus_texts),
        query_ids=[query_ids[i] for i in keep],
        query_texts=[query_texts[i] for i in keep],
        qrels=qrels,
        warnings={k: v for k, v in warnings.items() if v},
    )


def load_beir(folder: str, split: str) -> RetrievalData:
    """A BEIR folder's corpus, queries and ``qrels/<split>.tsv`` (only queries with qrels kept)."""
    qrels_path = os.path.join(folder, "qrels", f"{split}.tsv")
    for path in (os.path.join(folder, "corpus.jsonl"), os.path.join(folder, "queries.jsonl"), qrels_path):
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing; a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/{split}.tsv")
    corpus_ids, corpus_texts = _read_jsonl(os.path.join(folder, "corpus.jsonl"), ("_id", "id"), with_title=True)
    query_ids, query_texts = _read_jsonl(os.path.join(folder, "queries.jsonl"), ("_id", "id"), with_title=False)
    return _assemble(corpus_ids, corpus_texts, query_ids, query_texts, read_qrels_tsv(qrels_path), folder)


def load_cmteb(folder: str, split: str) -> RetrievalData:
    """A C-MTEB task as downloaded from the Hugging Face hub (see the module doc)."""
    corpus_files = _find(folder, ["corpus-*.parquet", "corpus.parquet", "corpus*.jsonl"])
    query_files = _find(folder, ["queries-*.parquet", "queries.parquet", "queries*.jsonl"])
    qrels_files = []
    for where in (folder, folder.rstrip("/") + "-qrels"):
        if os.path.isdir(where):
            qrels_files = qrels_files or _find(where, [f"{split}-*.parquet", f"{split}.parquet", f"{split}.jsonl"])
    missing = [name for name, files in (("corpus", corpus_files), ("queries", query_files), (f"{split} qrels", qrels_files)) if not files]
    if missing:
        raise DataError(
            f"{folder}: no {', '.join(missing)} file found; expected the C-MTEB layout (corpus-*.parquet, "
            f"queries-*.parquet, and {split}-*.parquet in the folder or in {os.path.basename(folder.rstrip('/'))}-qrels/)"
        )
    corpus = [row for path in corpus_files for row in _read_table(path)]
    queries = [row for path in query_files for row in _read_table(path)]
    qrel_rows = [(str(r["qid"]), str(r["pid"]), int(r["score"])) for path in qrels_files for r in _read_table(path)]
    return _assemble(
        [str(r["id"]) for r in corpus],
        [f"{r.get('title') or ''} {r['text']}".strip() for r in corpus],
        [str(r["id"]) for r in queries],
        [r["text"] for r in queries],
        qrel_rows,
        folder,
    )


def load_folder(folder: str, split: str) -> RetrievalData:
    """BEIR or C-MTEB layout, whichever the folder holds."""
    if os.path.isfile(os.path.join(folder, "corpus.jsonl")) and os.path.isdir(os.path.join(folder, "qrels")):
        return load_beir(folder, split)
    return load_cmteb(folder, split)
