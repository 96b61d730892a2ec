"""`vl-joint-encoder viquae-prepare`: from the published ViQuAE to training columns, BM25 runs and qrels.

    vl-joint-encoder viquae-prepare --output data          # hub ids (or --questions / --articles / --passages copies)

Writes under `--output`:
- `questions/`: the questions (`save_to_disk`, every split) with `provenance_indices`,
  `original_answer_provenance_indices` (meerqat's `find_relevant_item`), `BM25_provenance_indices` and
  `BM25_irrelevant_indices` (from BM25's top `--k`, EXPERIMENTS.rst:63-103);
- `articles/`: the article title and image columns in the authors' order (later steps read it instead of the 3 GB
  of JSON);
- `runs/bm25.<split>.json` (ranx JSON, passage rows as ids), `qrels.<split>.json` (the provenance qrels,
  `{question id: {passage row: 1}}`), `prepare.json` (counts and settings).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from . import command_main
from .viquae_common import ViquaeSourceArguments


@dataclass
class PrepareArguments:
    output: str = field(metadata={"help": "output folder"})
    splits: list[str] = field(default_factory=lambda: ["train", "validation", "test"], metadata={"help": "splits"})
    k: int = field(default=100, metadata={"help": "BM25 passages per question (the authors: 100)"})
    bm25_k1: float = field(default=0.5, metadata={"help": "BM25 k1 (the authors' Elasticsearch setting: 0.5)"})
    bm25_b: float = field(default=0.3, metadata={"help": "BM25 b (the authors': 0.3)"})
    workers: int = field(default=1, metadata={"help": "processes that tokenise passages for BM25"})
    threads: int = field(default=0, metadata={"help": "BM25 retrieval threads (0: one)"})
    negatives_order: Literal["rank", "meerqat"] = field(
        default="rank", metadata={"help": "BM25_irrelevant_indices in rank order, or meerqat's set order"}
    )
    on_missing_article: Literal["warn", "error"] = field(
        default="warn", metadata={"help": "a question whose provenance article is absent: warn (kept) or error"}
    )
    check_titles: int = field(default=1000, metadata={"help": "passages checked against their article's title"})
    save_index: bool = field(default=False, metadata={"help": "also save the BM25 index under <output>/bm25"})


def prepare(sources: ViquaeSourceArguments, args: PrepareArguments) -> int:
    import time

    import datasets

    from ..data.tables import column_values
    from ..utils.io import atomic_path, write_json
    from ..viquae.bm25 import BM25Index, run_from_hits
    from ..viquae.loading import load_articles, load_questions, read_viquae_kb
    from ..viquae.preparation import add_relevance, add_run_columns, qrels_from_column

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    start = time.perf_counter()
    questions = load_questions(sources.questions, args.splits)
    articles = load_articles(sources.articles)
    kb = read_viquae_kb(sources.passages, articles, check_titles=args.check_titles)
    print(f"{len(kb)} passages, {len(articles)} articles, questions {({s: len(q) for s, q in questions.items()})}")
    timings = {"load_s": time.perf_counter() - start}

    start = time.perf_counter()
    chunk = 100_000
    index = BM25Index.build(
        (kb.raw_texts(range(i, min(i + chunk, len(kb)))) for i in range(0, len(kb), chunk)), len(kb),
        k1=args.bm25_k1, b=args.bm25_b, n_workers=args.workers,
    )  # fmt: skip
    timings["bm25_index_s"] = time.perf_counter() - start
    if args.save_index:
        index.save(os.path.join(args.output, "bm25"))

    summary = {"passages": len(kb), "articles": len(articles), "k": args.k, "bm25": {"k1": args.bm25_k1, "b": args.bm25_b},
               "splits": {}}  # fmt: skip
    timings["bm25_search_s"] = timings["relevance_s"] = 0.0
    prepared = {}
    for split, table in questions.items():
        start = time.perf_counter()
        table = add_relevance(table, kb, name=f"{split} questions", on_missing_article=args.on_missing_article)
        timings["relevance_s"] += time.perf_counter() - start
        start = time.perf_counter()
        scores, rows = index.search(column_values(table, "input"), k=args.k, n_threads=args.threads)
        run = run_from_hits(column_values(table, "id"), scores, rows)
        table = add_run_columns(table, run, kb, "BM25", guard="original", negatives_order=args.negatives_order)
        timings["bm25_search_s"] += time.perf_counter() - start
        from ..retrieval.runs import write_run

        write_run(run, os.path.join(args.output, "runs", f"bm25.{split}.json"))
        write_json(os.path.join(args.output, f"qrels.{split}.json"), qrels_from_column(table), indent=None)
        prepared[split] = table
        summary["splits"][split] = {
            "questions": len(table),
            "without_provenance_passage": sum(not r for r in column_values(table, "provenance_indices")),
            "with_BM25_positive": sum(bool(r) for r in column_values(table, "BM25_provenance_indices")),
        }
    with atomic_path(os.path.join(args.output, "questions")) as tmp:
        datasets.DatasetDict(prepared).save_to_disk(tmp)
    with atomic_path(os.path.join(args.output, "articles")) as tmp:
        articles.save_to_disk(tmp)
    summary["seconds"] = {name: round(value, 2) for name, value in timings.items()}
    write_json(os.path.join(args.output, "prepare.json"), summary)
    print(f"prepared {summary['splits']} -> {args.output} ({summary['seconds']})")
    return 0


main = command_main(
    "vl-joint-encoder viquae-prepare", [ViquaeSourceArguments, PrepareArguments], prepare,
    "ViQuAE as published -> relevance columns, BM25 runs and negatives, qrels.",
)
