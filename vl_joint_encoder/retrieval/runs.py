"""Runs and qrels: in memory as dicts, on disk as ranx JSON or TREC files, read with errors that name file and line.

run: `{query_id: {passage_id: score}}` (ranked by score, descending); qrels: `{query_id: {passage_id: relevance}}`.
`.json` files are ranx's JSON; anything else is TREC (`qid Q0 pid rank score tag` / `qid 0 pid relevance`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch

from ..utils.io import atomic_write, read_json, write_json


Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


def to_run(query_ids: Sequence[str], scores: torch.Tensor, positions: torch.Tensor, passage_ids: Sequence[str]) -> Run:
    """{query_id: {passage_id: score}} in rank order; positions < 0 (fewer hits than k, from FAISS) are dropped."""
    run = {}
    for query_id, row_scores, row_positions in zip(query_ids, scores.tolist(), positions.tolist()):
        run[query_id] = {passage_ids[p]: float(s) for s, p in zip(row_scores, row_positions) if p >= 0}
    return run


def write_run(run: Mapping[str, Mapping[str, float]], path: str | os.PathLike, tag: str = "vl-joint-encoder") -> None:
    """ranx JSON if `path` ends in .json, TREC run format otherwise; written atomically."""
    path = os.fspath(path)
    if path.endswith(".json"):
        write_json(path, run, indent=1)
        return
    bad = [i for q, passages in run.items() for i in (q, *passages) if not str(i) or any(c.isspace() for c in str(i))]
    if bad:
        raise ValueError(
            f"cannot write {path!r} as a TREC run: {len(bad)} query / passage id(s) are empty or hold whitespace "
            f"(e.g. {bad[0]!r}), which splits a TREC line into other fields: write a .json run instead"
        )
    with atomic_write(path) as handle:
        for query_id, passages in run.items():
            for rank, (passage_id, score) in enumerate(passages.items(), 1):
                handle.write(f"{query_id} Q0 {passage_id} {rank} {score!r} {tag}\n")


def _json_mapping(data, path: str, what: str, value_type):
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(
            f"{what} {path!r} must be a JSON object {{query_id: {{passage_id: value}}}}, got "
            f"{type(data).__name__}" + ("" if not isinstance(data, dict) else " with non-object values")
        )
    out = {}
    for query_id, docs in data.items():
        out[str(query_id)] = {}
        for doc, value in docs.items():
            try:
                out[str(query_id)][str(doc)] = value_type(value)
            except (TypeError, ValueError):
                raise ValueError(f"{what} {path!r}: [{query_id!r}][{doc!r}] = {value!r} is not a number") from None
    return out


def load_run(path: str | os.PathLike) -> Run:
    """A run from ranx JSON (`{query: {passage: score}}`) or a TREC run file (`qid Q0 pid rank score tag`)."""
    path = os.fspath(path)
    if path.endswith(".json"):
        run = _json_mapping(read_json(path, "run file"), path, "run file", float)
    else:
        run = {}
        for line_number, parts in _lines(path, "run file"):
            if len(parts) != 6:
                raise ValueError(f"{path}:{line_number}: a TREC run line has 6 fields (qid Q0 pid rank score tag)")
            try:
                run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
            except ValueError:
                raise ValueError(f"{path}:{line_number}: the score {parts[4]!r} is not a number") from None
    bad = [(q, d) for q, docs in run.items() for d, s in docs.items() if not math.isfinite(s)]
    if bad:
        raise ValueError(f"run file {path!r} has {len(bad)} NaN/infinite scores (e.g. {bad[0]}): fix the scoring")
    return run


def load_qrels(path: str | os.PathLike) -> Qrels:
    """qrels from JSON (`{query: {passage: relevance}}`) or a TREC qrels file (`qid 0 pid relevance`)."""
    path = os.fspath(path)
    if path.endswith(".json"):
        return _json_mapping(read_json(path, "qrels file"), path, "qrels file", _relevance)
    qrels: Qrels = {}
    for line_number, parts in _lines(path, "qrels file"):
        if len(parts) != 4:
            raise ValueError(f"{path}:{line_number}: a TREC qrels line has 4 fields (qid 0 pid relevance)")
        try:
            qrels.setdefault(parts[0], {})[parts[2]] = _relevance(parts[3])
        except ValueError:
            raise ValueError(f"{path}:{line_number}: the relevance {parts[3]!r} is not an integer") from None
    return qrels


def _relevance(value) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"relevance must be an integer (ranx convention), got {value!r}")
    return int(float(value))


def _lines(path: str, what: str):
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if line.strip():
                yield line_number, line.split()


__all__ = ["Qrels", "Run", "load_qrels", "load_run", "to_run", "write_run"]
