"""Know the data before training (`vl-joint-encoder data-report`).

For queries and KB, with the model's tokenizer: unknown-token rate (and the words behind it: rare entity names and
non-English text show up here first), length distribution and the share truncated at the chosen max length, images
found / missing, queries without positives, ids missing from the KB, positives / negatives per query.

First of all, `refusals`: every problem for which `train` would refuse the data (`tables.training_data_problems`,
the same readers and checks `train` runs: null / duplicate ids, missing columns, empty texts without an image, ids
absent from the KB, ...), plus image references that resolve to nothing. The statistics a problem makes impossible
(e.g. token lengths of a missing question column) are left out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from .feature_stores import open_feature_store
from .references import reference_counts
from .tables import (
    ColumnMapping,
    column_values,
    empty_text_rows,
    id_list,
    iter_values,
    load_table,
    read_knowledge_base,
    training_data_problems,
    undecoded_images,
)


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
    on_missing_positive: str = "skip",
) -> dict[str, Any]:
    """The report as a dict (see the module docstring). Token statistics of a KB larger than `max_passages` are
    computed on a random sample of that many passages (said in the report). Unreadable files raise (nothing to
    report on); everything else `train` would refuse is listed under `refusals`."""
    mapping = mapping or ColumnMapping()
    feature_store = open_feature_store(feature_store)
    queries = undecoded_images(load_table(queries, "the queries"), mapping.query_image)
    kb = undecoded_images(load_table(kb, "the KB"), mapping.passage_image)
    refusals = training_data_problems(queries, kb, mapping, on_missing_positive)
    try:
        knowledge_base = read_knowledge_base(kb, mapping, check_texts=False)
    except ValueError:
        knowledge_base = None  # its problems are in the refusals
    has = queries.column_names
    positives = [id_list(v) for v in column_values(queries, mapping.positive_ids)] if mapping.positive_ids in has else None
    has_negatives = mapping.negative_ids is not None and mapping.negative_ids in has
    negatives = [id_list(v) for v in column_values(queries, mapping.negative_ids)] if has_negatives else None
    missing_ids = None
    if knowledge_base is not None and positives is not None:
        values = [v for ids in positives + (negatives or []) for v in ids]
        missing_ids = [v for v, row in zip(values, knowledge_base.rows_of(values)) if row < 0]
    has_query_images = mapping.query_image is not None and mapping.query_image in has
    images = reference_counts(column_values(queries, mapping.query_image) if has_query_images else [], feature_store, image_root)
    kb_image_column = mapping.passage_image if mapping.passage_image in kb.column_names else None
    kb_images = reference_counts(iter_values(kb, kb_image_column) if kb_image_column else [], feature_store, image_root)
    for what, counts in (("queries", images), ("KB passages", kb_images)):
        if counts["missing"]:
            refusals.append(
                f"{counts['missing']} {what} reference images that are neither existing files nor feature-store keys "
                f"(training fails at the first batch holding one): fix the paths, --image_root or --feature_store"
            )
    sample = kb
    if max_passages is not None and len(kb) > max_passages:
        rows = np.sort(np.random.default_rng(seed).choice(len(kb), size=max_passages, replace=False))
        sample = kb.select(rows)
    has_text = mapping.passage_text in kb.column_names
    return {
        "refusals": refusals,
        "queries": {
            "count": len(queries),
            "without_positive": sum(not p for p in positives) if positives is not None else None,
            "positives_per_query": _distribution([len(p) for p in positives]) if positives is not None else None,
            "negatives_per_query": _distribution([len(n) for n in negatives]) if negatives is not None else None,
            "ids_missing_from_kb": len(missing_ids) if missing_ids is not None else None,
            "example_missing_ids": [str(v) for v in (missing_ids or [])[:5]],
            "images": dict(images),
            "text": text_report(column_values(queries, mapping.question), tokenizer, query_max_length)
            if mapping.question in has else None,
        },
        "kb": {
            "count": len(kb),
            "sampled_for_tokens": len(sample),
            "empty_texts": len(empty_text_rows(kb, mapping.passage_text)) if has_text else None,
            "images": dict(kb_images),
            "text": text_report(column_values(sample, mapping.passage_text), tokenizer, passage_max_length) if has_text else None,
        },
    }


def format_report(report: dict[str, Any]) -> str:
    refusals = report.get("refusals") or []
    if refusals:
        lines = [f"== train would refuse this data ({len(refusals)} problem(s)):"]
        lines += [f"- {problem}" for problem in refusals]
    else:
        lines = ["== train accepts this data (no problem found)"]
    for part in ("queries", "kb"):
        r = report[part]
        text = r["text"]
        lines.append(f"== {part} ({r['count']})")
        if part == "queries":
            if r["without_positive"] is not None:
                lines.append(f"without a positive: {r['without_positive']}")
                lines.append(f"positives per query: {r['positives_per_query']}")
            lines.append(f"hard negatives per query: {r['negatives_per_query'] or 'no negatives column'}")
            if r["ids_missing_from_kb"]:
                lines.append(f"ids missing from the KB: {r['ids_missing_from_kb']} (e.g. {r['example_missing_ids']})")
        else:
            if r["empty_texts"] is not None:
                lines.append(f"empty texts: {r['empty_texts']}")
            if r["sampled_for_tokens"] < r["count"]:
                lines.append(f"token statistics on a random sample of {r['sampled_for_tokens']} passages")
        lines.append(f"images: found {r['images'].get('found', 0)}, missing {r['images'].get('missing', 0)}, "
                     f"none {r['images'].get('none', 0)}")
        if text is None:
            continue
        lines.append(f"tokens: {text['tokens']}")
        lines.append(f"truncated at {text['max_length']} tokens: {100 * text['truncated_share']:.1f}%")
        lines.append(f"unknown-token rate: {100 * text['unknown_token_rate']:.3f}%"
                     + (f"; most frequent words with <unk>: {text['top_unknown_words']}" if text["top_unknown_words"] else ""))
    return "\n".join(lines)


__all__ = ["data_report", "format_report", "text_report"]
