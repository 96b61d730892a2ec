"""Know the data before training (`vl-joint-encoder data-report`).

For queries and KB, with the model's tokenizer: unknown-token rate (and the words behind it: rare entity names and
non-English text show up here first), length distribution and the share truncated at the chosen max length, images
found / missing, queries without positives, ids missing from the KB, positives / negatives per query.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from .feature_stores import open_feature_store
from .references import reference_counts
from .tables import ColumnMapping, empty_text_rows, id_list, load_table, read_knowledge_base, undecoded_images


def _distribution(values: Sequence[int]) -> dict[str, float]:
    array = np.asarray(values if len(values) else [0])
    return {"min": int(array.min()), "mean": round(float(array.mean()), 2), "p50": round(float(np.percentile(array, 50)), 1),
            "p90": round(float(np.percentile(array, 90)), 1), "p99": round(float(np.percentile(array, 99)), 1), "max": int(array.max())}


def text_report(texts: Sequence[str], tokenizer, max_length: int, batch_size: int = 1000) -> dict[str, Any]:
    """Token lengths (with special tokens), share longer than `max_length`, `<unk>` rate and its most common words."""
    from tqdm.auto import tqdm

    lengths, unknown, total = [], 0, 0
    unknown_words = Counter()
    unk_id = tokenizer.unk_token_id
    for start in tqdm(range(0, len(texts), batch_size), desc="tokenising", leave=False):
        chunk = [str(t) if t is not None else "" for t in texts[start : start + batch_size]]
        encoded = tokenizer(chunk, add_special_tokens=True, truncation=False)["input_ids"]
        for text, ids in zip(chunk, encoded):
            lengths.append(len(ids))
            total += len(ids)
            n_unknown = sum(i == unk_id for i in ids) if unk_id is not None else 0
            unknown += n_unknown
            if n_unknown:
                for word in text.split():
                    if unk_id in tokenizer(word, add_special_tokens=False)["input_ids"]:
                        unknown_words[word] += 1
    return {
        "texts": len(lengths),
        "tokens": _distribution(lengths),
        "max_length": max_length,
        "truncated_share": round(float(np.mean(np.asarray(lengths) > max_length)) if lengths else 0.0, 4),
        "unknown_token_rate": round(unknown / total, 6) if total else 0.0,
        "top_unknown_words": unknown_words.most_common(10),
    }


def data_report(
    queries: Any,
    kb: Any,
    tokenizer,
    mapping: ColumnMapping | None = None,
    query_max_length: int = 64,
    passage_max_length: int = 256,
    feature_store: Any = None,
    image_root: str | None = None,
    max_passages: int | None = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """The report as a dict (see the module docstring). Token statistics of a KB larger than `max_passages` are
    computed on a random sample of that many passages (said in the report)."""
    mapping = mapping or ColumnMapping()
    feature_store = open_feature_store(feature_store)
    queries = undecoded_images(load_table(queries, "queries"), mapping.query_image)
    kb = undecoded_images(load_table(kb, "the KB"), mapping.passage_image)
    for name, dataset, required in (("queries", queries, (mapping.question, mapping.positive_ids)),
                                    ("the KB", kb, (mapping.passage_text,))):
        missing = [c for c in required if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{name} lack the column(s) {missing}; they have {dataset.column_names} (see --columns)")
    knowledge_base = read_knowledge_base(kb, mapping, check_texts=False)
    positives = [id_list(v) for v in queries[mapping.positive_ids]]
    has_negatives = mapping.negative_ids is not None and mapping.negative_ids in queries.column_names
    negatives = [id_list(v) for v in queries[mapping.negative_ids]] if has_negatives else [[] for _ in positives]
    missing_ids = [v for ids in positives + negatives for v in ids if knowledge_base.row_of(v) is None]
    has_query_images = mapping.query_image is not None and mapping.query_image in queries.column_names
    images = reference_counts(queries[mapping.query_image] if has_query_images else [], feature_store, image_root)
    kb_images = reference_counts(knowledge_base.images() or [], feature_store, image_root)
    sample = kb
    if max_passages is not None and len(kb) > max_passages:
        rows = np.sort(np.random.default_rng(seed).choice(len(kb), size=max_passages, replace=False))
        sample = kb.select(rows)
    return {
        "queries": {
            "count": len(queries),
            "without_positive": sum(not p for p in positives),
            "positives_per_query": _distribution([len(p) for p in positives]),
            "negatives_per_query": _distribution([len(n) for n in negatives]) if has_negatives else None,
            "ids_missing_from_kb": len(missing_ids),
            "example_missing_ids": [str(v) for v in missing_ids[:5]],
            "images": dict(images),
            "text": text_report(queries[mapping.question], tokenizer, query_max_length),
        },
        "kb": {
            "count": len(kb),
            "sampled_for_tokens": len(sample),
            "empty_texts": len(empty_text_rows(kb, mapping.passage_text)),
            "images": dict(kb_images),
            "text": text_report(sample[mapping.passage_text], tokenizer, passage_max_length),
        },
    }


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for part in ("queries", "kb"):
        r = report[part]
        text = r["text"]
        lines.append(f"== {part} ({r['count']})")
        if part == "queries":
            lines.append(f"without a positive: {r['without_positive']}")
            lines.append(f"positives per query: {r['positives_per_query']}")
            lines.append(f"hard negatives per query: {r['negatives_per_query'] or 'no negatives column'}")
            if r["ids_missing_from_kb"]:
                lines.append(f"ids missing from the KB: {r['ids_missing_from_kb']} (e.g. {r['example_missing_ids']})")
        else:
            lines.append(f"empty texts: {r['empty_texts']}")
            if r["sampled_for_tokens"] < r["count"]:
                lines.append(f"token statistics on a random sample of {r['sampled_for_tokens']} passages")
        lines.append(f"images: found {r['images'].get('found', 0)}, missing {r['images'].get('missing', 0)}, "
                     f"none {r['images'].get('none', 0)}")
        lines.append(f"tokens: {text['tokens']}")
        lines.append(f"truncated at {text['max_length']} tokens: {100 * text['truncated_share']:.1f}%")
        lines.append(f"unknown-token rate: {100 * text['unknown_token_rate']:.3f}%"
                     + (f"; most frequent words with <unk>: {text['top_unknown_words']}" if text["top_unknown_words"] else ""))
    return "\n".join(lines)


__all__ = ["data_report", "format_report", "text_report"]
