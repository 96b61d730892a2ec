"""`vl-joint-encoder data-report`: know the data before training.

For queries and KB, with the model's tokenizer: unknown-token rate (and the words behind it: rare entity names and
non-English text show up here first), length distribution and the share truncated at the chosen max length, images
found / missing, queries without positives, ids missing from the KB, positives / negatives per query.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers.utils import logging

from .data import ColumnMapping, _id_list, build_kb_index, load_table


logger = logging.get_logger(__name__)


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


def _image_status(value: Any, feature_store: Mapping | None, image_root: str | None) -> str:
    """'none', 'found' or 'missing' for one image reference (files are checked for existence, not decoded)."""
    if value is None:
        return "none"
    if isinstance(value, str):
        if feature_store is not None and value in feature_store:
            return "found"
        path = os.path.join(image_root, value) if image_root and not os.path.isabs(value) else value
        return "found" if os.path.exists(path) else "missing"
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return "found"
        path = value.get("path")
        if not path:
            return "none"
        path = os.path.join(image_root, path) if image_root and not os.path.isabs(path) else path
        return "found" if os.path.exists(path) else "missing"
    return "found"  # PIL images, inline features


def data_report(
    queries: Any,
    kb: Any,
    tokenizer,
    mapping: ColumnMapping | None = None,
    query_max_length: int = 64,
    passage_max_length: int = 256,
    feature_store: Mapping | None = None,
    image_root: str | None = None,
    max_passages: int | None = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """The report as a dict (see the module docstring). Token statistics of a KB larger than `max_passages` are
    computed on a random sample of that many passages (said in the report)."""
    mapping = mapping or ColumnMapping()
    queries, kb = load_table(queries, "queries"), load_table(kb, "the KB")
    queries = _undecoded(queries, mapping.query_image)
    kb = _undecoded(kb, mapping.passage_image)
    for name, dataset, required in (("queries", queries, (mapping.question, mapping.positive_ids)),
                                    ("the KB", kb, (mapping.passage_text,))):
        missing = [c for c in required if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{name} lack the column(s) {missing}; they have {dataset.column_names} (see --columns)")
    _, index = build_kb_index(kb, mapping)

    def in_kb(value) -> bool:
        if index is not None:
            return str(value) in index
        try:
            return 0 <= int(value) < len(kb)
        except (TypeError, ValueError):
            return False

    positives = [_id_list(v) for v in queries[mapping.positive_ids]]
    has_negatives = mapping.negative_ids is not None and mapping.negative_ids in queries.column_names
    negatives = [_id_list(v) for v in queries[mapping.negative_ids]] if has_negatives else [[] for _ in positives]
    missing_ids = [v for ids in positives + negatives for v in ids if not in_kb(v)]
    images = Counter(
        _image_status(v, feature_store, image_root)
        for v in (queries[mapping.query_image] if mapping.query_image in queries.column_names else [])
    )
    kb_images = Counter(
        _image_status(v, feature_store, image_root)
        for v in (kb[mapping.passage_image] if mapping.passage_image and mapping.passage_image in kb.column_names else [])
    )
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
            "empty_texts": sum(not str(t or "").strip() for t in kb[mapping.passage_text]),
            "images": dict(kb_images),
            "text": text_report(sample[mapping.passage_text], tokenizer, passage_max_length),
        },
    }


def _undecoded(dataset, column):
    import datasets

    if column and column in dataset.column_names and isinstance(dataset.features[column], datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vl-joint-encoder data-report", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model (or tokenizer) folder whose tokenizer to use")
    parser.add_argument("--queries", required=True, nargs="+", help="query files or a save_to_disk folder")
    parser.add_argument("--kb", required=True, nargs="+", help="KB files or a save_to_disk folder")
    parser.add_argument("--columns", choices=("generic", "viquae"), default="generic")
    parser.add_argument("--viquae-positives", default="provenance_indices")
    parser.add_argument("--viquae-negatives", default="BM25_irrelevant_indices")
    parser.add_argument("--query-max-length", type=int, default=64)
    parser.add_argument("--passage-max-length", type=int, default=256)
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--feature-store", default=None, help=".npz/.safetensors of precomputed features")
    parser.add_argument("--max-passages", type=int, default=100_000, help="sample this many passages for tokens")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    from vl_joint_encoder.cli import accept_both_spellings

    args = accept_both_spellings(parser).parse_args(argv)
    try:
        from transformers import AutoTokenizer

        from .data import load_feature_store

        tokenizer_dir = args.model
        if os.path.isdir(os.path.join(args.model, "query_encoder")) and not os.path.isfile(
            os.path.join(args.model, "tokenizer_config.json")
        ):
            tokenizer_dir = os.path.join(args.model, "query_encoder")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        mapping = (ColumnMapping.viquae(args.viquae_positives, args.viquae_negatives) if args.columns == "viquae"
                   else ColumnMapping())
        store = load_feature_store(args.feature_store) if args.feature_store else None
        report = data_report(
            args.queries if len(args.queries) > 1 else args.queries[0],
            args.kb if len(args.kb) > 1 else args.kb[0],
            tokenizer, mapping, args.query_max_length, args.passage_max_length, store, args.image_root,
            args.max_passages,
        )
    except (ValueError, OSError) as error:
        print(f"vl-joint-encoder data-report: error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
