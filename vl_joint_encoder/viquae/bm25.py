"""BM25 over the ViQuAE passages with bm25s (Lù 2024, https://github.com/xhluca/bm25s), set up as the authors' run.

The authors index the column ``passage`` (title prefix included) in Elasticsearch with the ``standard`` analyzer and
a BM25 similarity of ``b=0.3, k1=0.5`` (tuned on validation ``mrr@100``), and query it with the question ``input``
(``experiments/ir/viquae/bm25/config.json``, ``meerqat/ir/search.py``). Here:

- scoring is bm25s's ``method="lucene"``: ``idf = log(1 + (N - df + 0.5) / (df + 0.5))`` times
  ``tf / (tf + k1 * (1 - b + b * dl / avgdl))``, Lucene's BM25Similarity, with statistics over the whole KB (an
  Elasticsearch index of one shard, the default since 7.0); a query term repeated counts twice, as in a ``match``
  query. Only passages that share a term with the query are returned (Elasticsearch returns no zero-score hit).
  Not reproduced: Lucene stores document lengths in one byte (lossy above ~40 tokens), which moves scores by a
  few percent and can swap near-ties.
- ``standard_analyzer`` follows the ``standard`` analyzer: Unicode word segmentation (UAX #29), lower case, no stop
  words, tokens of at most 255 characters. Its regular expression implements the UAX #29 rules for letters and
  digits and the ASCII "mid" characters (``l'homme``, ``U.S.A``, ``3.5``, ``1,000`` stay one token; ``e-mail``
  and ``1990-1995`` split); it does not reproduce the rules for ideographs, emoji and Hebrew/Katakana letters.

Memory and time at full scale are measured by ``benchmarks/bench_viquae_prep.py`` (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm
from transformers.utils import logging

from ..utils.io import atomic_path, read_json, write_json


logger = logging.get_logger(__name__)

K1, B = 0.5, 0.3  # experiments/ir/viquae/bm25/config.json ("similarity": {"viquae_bm25": {"b": 0.3, "k1": 0.5}})
MAX_TOKEN_LENGTH = 255  # Elasticsearch standard tokenizer's max_token_length
# UAX #29: a "mid" character joins two letters (WB6/7: MidLetter, MidNumLet) or two digits (WB11/12: MidNum,
# MidNumLet); the ASCII ones and the typographic apostrophe. Candidates are cut with a cheap pattern, then the few
# holding a mid character are re-split by the rules.
_CANDIDATE = re.compile(r"\w+(?:[.'’:·,;]\w+)*")
_MID = re.compile(r"([.'’:·,;])")
_LETTER_MIDS, _DIGIT_MIDS = frozenset(".'’:·"), frozenset(".,;'’")
INDEX_META = "viquae_bm25.json"


def _split_mids(token: str) -> list[str]:
    parts = _MID.split(token)  # word, mid, word, mid, word...
    out = [parts[0]]
    for mid, word in zip(parts[1::2], parts[2::2]):
        left = out[-1][-1]
        joins = (left.isalpha() and word[0].isalpha() and mid in _LETTER_MIDS) or (
            left.isdigit() and word[0].isdigit() and mid in _DIGIT_MIDS
        )
        if joins:
            out[-1] += mid + word
        else:
            out.append(word)
    return out


def standard_analyzer(text: str) -> list[str]:
    """The tokens Elasticsearch's ``standard`` analyzer makes of `text` (see the module docstring)."""
    candidates = _CANDIDATE.findall(text.lower())
    if "".join(candidates).isalnum() and max(map(len, candidates), default=0) <= MAX_TOKEN_LENGTH:
        return candidates  # the common case: no mid character, no "_", no overlong token
    tokens = []
    for candidate in candidates:
        for token in _split_mids(candidate) if not candidate.isalnum() and _MID.search(candidate) else (candidate,):
            if not token.strip("_"):
                continue
            if len(token) > MAX_TOKEN_LENGTH:
                tokens.extend(token[i : i + MAX_TOKEN_LENGTH] for i in range(0, len(token), MAX_TOKEN_LENGTH))
            else:
                tokens.append(token)
    return tokens


def _analyze_chunk(texts: list[str]) -> list[list[str]]:
    return [standard_analyzer(text) for text in texts]


def analyze(texts: Iterable[Sequence[str]], n_workers: int = 1) -> Iterable[list[list[str]]]:
    """Token lists, chunk by chunk (`texts` yields chunks), with `n_workers` processes when > 1."""
    if n_workers <= 1:
        for chunk in texts:
            yield _analyze_chunk(list(chunk))
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(n_workers) as pool:
        yield from pool.imap(_analyze_chunk, (list(chunk) for chunk in texts))


class BM25Index:
    """
    A bm25s index over passage texts (ids = positions), with the authors' parameters and analyzer.

    `BM25Index.build(chunks)` indexes texts given chunk by chunk (e.g. 100,000 passages at a time read from Arrow);
    `search(queries, k)` -> `(scores (Q, k), rows (Q, k))`, rows -1 past the last hit; `save` / `load` keep it.
    """

    def __init__(self, retriever, vocabulary: dict[str, int], count: int, k1: float, b: float):
        self.retriever = retriever
        self.vocabulary = vocabulary
        self.count = count
        self.k1, self.b = k1, b

    @classmethod
    def build(cls, chunks: Iterable[Sequence[str]], count: int, k1: float = K1, b: float = B, n_workers: int = 1,
              progress: bool = True) -> BM25Index:  # fmt: skip
        import bm25s

        vocabulary: dict[str, int] = {}
        ids: list[list[int]] = []
        bar = tqdm(total=count, unit="passage", desc="BM25 analyze", disable=not progress)
        for tokens in analyze(chunks, n_workers):
            for document in tokens:
                ids.append([vocabulary.setdefault(token, len(vocabulary)) for token in document])
            bar.update(len(tokens))
        bar.close()
        if len(ids) != count:
            raise ValueError(f"BM25: {len(ids)} passages were read, {count} expected")
        retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        retriever.index((ids, vocabulary), show_progress=progress)
        return cls(retriever, retriever.vocab_dict, count, k1, b)

    def search(self, queries: Sequence[str], k: int = 100, n_threads: int = 0, progress: bool = True):
        """Top-`k` passages per query: (scores (Q, k) float32, rows (Q, k) int64, -1 where fewer passages match)."""
        k = min(k, self.count)
        tokens = [[t for t in standard_analyzer(query) if t in self.vocabulary] for query in queries]
        scores = np.zeros((len(queries), k), dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        todo = [q for q, t in enumerate(tokens) if t]
        if todo:
            found, found_scores = self.retriever.retrieve(
                [tokens[q] for q in todo], k=k, show_progress=progress, n_threads=n_threads
            )
            found_scores = np.asarray(found_scores, dtype=np.float32)
            found = np.where(found_scores > 0, np.asarray(found, dtype=np.int64), -1)  # a match scores > 0
            scores[todo], rows[todo] = np.where(found >= 0, found_scores, 0), found
        return scores, rows

    def save(self, directory: str | os.PathLike) -> None:
        directory = os.fspath(directory)
        with atomic_path(os.path.join(directory, "bm25s")) as tmp:
            self.retriever.save(tmp)
        write_json(os.path.join(directory, INDEX_META), {"count": self.count, "k1": self.k1, "b": self.b,
                                                         "analyzer": "elasticsearch-standard"})

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> BM25Index:
        import bm25s

        directory = os.fspath(directory)
        meta = read_json(os.path.join(directory, INDEX_META), "BM25 index metadata")
        retriever = bm25s.BM25.load(os.path.join(directory, "bm25s"), mmap=mmap)
        return cls(retriever, retriever.vocab_dict, int(meta["count"]), float(meta["k1"]), float(meta["b"]))


def run_from_hits(query_ids: Sequence[str], scores: np.ndarray, rows: np.ndarray) -> dict[str, dict[str, float]]:
    """`{query id: {passage row as str: score}}`, in rank order, without the -1 padding."""
    return {
        query_id: {str(r): float(s) for s, r in zip(row_scores.tolist(), row_rows.tolist()) if r >= 0}
        for query_id, row_scores, row_rows in zip(query_ids, scores, rows)
    }


__all__ = ["B", "K1", "BM25Index", "analyze", "run_from_hits", "standard_analyzer"]
