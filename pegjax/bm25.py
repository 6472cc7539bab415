"""BM25 candidates for mining with a model that is not trained yet (any language).

Tokens: lower-cased words for alphabetic scripts; for Chinese/Japanese/Korean, every character and
every pair of adjacent characters (no word segmenter needed).
"""

from __future__ import annotations

import re

import numpy as np

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(f"[{_CJK}]+|[^\\W_]+", re.UNICODE)
_CJK_RUN = re.compile(f"[{_CJK}]+")


def tokens(text: str) -> list[str]:
    out = []
    for piece in _TOKEN.findall(text.lower()):
        if _CJK_RUN.fullmatch(piece):
            out.extend(piece)
            out.extend(piece[i : i + 2] for i in range(len(piece) - 1))
        else:
            out.append(piece)
    return out


class BM25:
    """Okapi BM25 over a corpus: ``search(queries, k)`` -> (scores [Q, k], rows [Q, k])."""

    def __init__(self, corpus: list[str], k1: float = 1.2, b: float = 0.75):
        from scipy import sparse

        self.vocabulary: dict[str, int] = {}
        rows, cols, counts = [], [], []
        lengths = np.zeros(len(corpus), np.float32)
        for row, text in enumerate(corpus):
            terms = tokens(text)
            lengths[row] = len(terms)
            unique, tf = np.unique([self.vocabulary.setdefault(t, len(self.vocabulary)) for t in terms] or [0], return_counts=True)
            if terms:
                rows.extend([row] * len(unique))
                cols.extend(unique.tolist())
                counts.extend(tf.tolist())
        tf = sparse.csr_matrix((np.asarray(counts, np.float32), (rows, cols)), shape=(len(corpus), max(len(self.vocabulary), 1)))
        df = np.bincount(tf.indices, minlength=tf.shape[1]).astype(np.float32)
        idf = np.log1p((len(corpus) - df + 0.5) / (df + 0.5))
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))
        tf = tf.tocoo()
        weights = idf[tf.col] * tf.data * (k1 + 1) / (tf.data + norm[tf.row])
        self.weights = sparse.csr_matrix((weights, (tf.row, tf.col)), shape=tf.shape).T.tocsr()  # [V, N]
        self.size = len(corpus)

    def _query_matrix(self, queries: list[str]):
        from scipy import sparse

        rows, cols = [], []
        for row, text in enumerate(queries):
            ids = {self.vocabulary[t] for t in tokens(text) if t in self.vocabulary}
            rows.extend([row] * len(ids))
            cols.extend(ids)
        return sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(queries), self.weights.shape[0]))

    def scores(self, queries: list[str]) -> np.ndarray:
        """[Q, N] float32 BM25 scores."""
        return np.asarray((self._query_matrix(queries) @ self.weights).todense(), dtype=np.float32)

    def search(self, queries: list[str], k: int, batch: int = 512):
        k = min(k, self.size)
        all_scores, all_rows = [], []
        for start in range(0, len(queries), batch):
            scores = self.scores(queries[start : start + batch])
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
            rows = np.take_along_axis(part, order, axis=1)
            all_rows.append(rows)
            all_scores.append(np.take_along_axis(scores, rows, axis=1))
        if not all_rows:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(all_scores), np.concatenate(all_rows).astype(np.int64)
