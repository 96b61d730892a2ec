"""The columns ViQuAE's authors compute before training (EXPERIMENTS.rst:45-103), added to the question tables.

- `add_relevance` (``meerqat.ir.metrics relevant``): ``provenance_indices`` (passages of the provenance
  article(s) that contain any answer) and ``original_answer_provenance_indices`` (those with the original answer).
- `add_run_columns` (``keep_relevant_search_wrt_original_in_priority``): from a run of system KEY,
  ``KEY_provenance_indices`` (retrieved passages with the original answer, else the
  ``original_answer_provenance_indices``) and ``KEY_irrelevant_indices`` (the other retrieved passages). With
  ``guard="original"`` (the authors' rule, used for BM25) a negative only lacks the original answer and may hold an
  alias; ``guard="any"`` (the false-negative guard, default when mining with a trained model) also drops every
  retrieved passage that contains any answer.

Positives and negatives of a key always come from the same run. Passage ids are KB rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers.utils import logging

from ..data.tables import ColumnMapping, few
from .loading import ViquaeKnowledgeBase
from .relevance import AnswerMatcher, provenance_relevance, training_indices_from_run


logger = logging.get_logger(__name__)

GUARDS = ("original", "any")
NEGATIVES_ORDERS = ("rank", "meerqat")


def viquae_columns(key: str | None = "BM25", question_image: str | None = "image") -> ColumnMapping:
    """The `ColumnMapping` of prepared ViQuAE questions over a `ViquaeKnowledgeBase`: ``input`` / `question_image`,
    positives ``{key}_provenance_indices`` and negatives ``{key}_irrelevant_indices`` (key None: positives
    ``provenance_indices``, no hard negatives), passages identified by row."""
    return ColumnMapping(
        query_id="id",
        question="input",
        query_image=question_image,
        positive_ids=f"{key}_provenance_indices" if key else "provenance_indices",
        negative_ids=f"{key}_irrelevant_indices" if key else None,
        passage_id=None,
        passage_text="passage",
        passage_image=None,
    )


def _titles(item: Mapping) -> list[str]:
    titles = []
    for provenance in item["output"]["provenance"] or []:
        if provenance["title"] and provenance["title"][0] not in titles:
            titles.append(provenance["title"][0])
    return titles


def add_relevance(questions, kb: ViquaeKnowledgeBase, name: str = "questions", on_missing_article: str = "warn"):
    """
    `questions` (a `datasets.Dataset` of viquae_dataset) with ``provenance_indices`` and
    ``original_answer_provenance_indices`` added (any previous ones replaced).

    A question whose provenance articles are all absent from the KB keeps empty lists (meerqat skips such titles
    silently); they are counted and named in a warning, or raise with ``on_missing_article="error"``.
    """
    if on_missing_article not in ("warn", "error"):
        raise ValueError(f"on_missing_article must be 'warn' or 'error', got {on_missing_article!r}")
    title2index, article2passage = kb.title2index, kb.article2passage
    relevant_column, original_column, absent = [], [], []
    for item in questions:
        titles = _titles(item)
        missing = [title for title in titles if title not in title2index]
        if missing:
            absent.append((item["id"], missing))
        rows = [row for title in titles if title in title2index for row in article2passage.get(title2index[title], [])]
        texts = dict(zip(rows, kb.raw_texts(rows)))
        relevant, original = provenance_relevance(item, title2index, article2passage, texts.__getitem__)
        relevant_column.append(relevant)
        original_column.append(original)
    if absent:
        shown = ", ".join(f"{q} ({', '.join(map(repr, titles))})" for q, titles in absent[:5])
        message = (
            f"{len(absent)} {name} cite provenance articles absent from the articles' titles, e.g. {shown}: their "
            f"passages cannot be judged"
        )
        if on_missing_article == "error":
            raise ValueError(message + "; pass the article files the passages were built from")
        logger.warning(message + " (questions kept; those with no provenance left get empty provenance_indices)")
    n_empty = sum(not r for r in relevant_column)
    if n_empty:
        logger.info(f"{n_empty} of {len(questions)} {name} have no relevant provenance passage")
    return _with_columns(questions, {"provenance_indices": relevant_column,
                                     "original_answer_provenance_indices": original_column})


def add_run_columns(
    questions,
    run: Mapping[str, Mapping[str, float]],
    kb: ViquaeKnowledgeBase,
    key: str,
    guard: str = "original",
    negatives_order: str = "rank",
):
    """
    `questions` (with ``original_answer_provenance_indices``, from `add_relevance`) with ``{key}_provenance_indices``
    and ``{key}_irrelevant_indices`` from `run` (`{question id: {passage row: score}}`, rank order).

    `negatives_order`: ``rank`` keeps the run order; ``meerqat`` is the authors' ``list(set(indices) -
    set(relevant))`` (the same passages, in CPython's set order). A question absent from the run gets its fallback
    positives and no negative.
    """
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")
    if negatives_order not in NEGATIVES_ORDERS:
        raise ValueError(f"negatives_order must be one of {NEGATIVES_ORDERS}, got {negatives_order!r}")
    if "original_answer_provenance_indices" not in questions.column_names:
        raise ValueError("add the relevance columns first (add_relevance): the positives fall back on them")
    positives_column, negatives_column, absent = [], [], []
    for item in questions:
        scores = run.get(item["id"])
        if scores is None:
            absent.append(item["id"])
        ranked = [int(d) for d, _ in sorted((scores or {}).items(), key=lambda pair: -pair[1])]
        texts = dict(zip(ranked, kb.raw_texts(ranked)))
        positives, negatives = training_indices_from_run(
            ranked, texts.__getitem__, item["output"]["original_answer"],
            item["original_answer_provenance_indices"], negatives_order=negatives_order,
        )  # fmt: skip
        if guard == "any":
            matcher = AnswerMatcher.from_item(item)
            negatives = [row for row in negatives if not matcher.contains(texts[row])]
        positives_column.append(positives)
        negatives_column.append(negatives)
    if absent:
        logger.warning(f"{len(absent)} questions are not in the {key} run ({few(absent)}): no {key} negatives for them")
    return _with_columns(questions, {f"{key}_provenance_indices": positives_column,
                                     f"{key}_irrelevant_indices": negatives_column})


def qrels_from_column(questions, column: str = "provenance_indices") -> dict[str, dict[str, int]]:
    """meerqat's qrels of a split: ``{question id: {str(passage row): 1}}`` (a question without one maps to {})."""
    return {item_id: {str(row): 1 for row in rows} for item_id, rows in zip(questions["id"], questions[column])}


def _with_columns(table, columns: Mapping[str, Sequence[Sequence[int]]]):
    import datasets

    for name, values in columns.items():
        if name in table.column_names:
            table = table.remove_columns(name)
        table = table.add_column(name, [list(map(int, v)) for v in values],
                                 feature=datasets.List(datasets.Value("int64")))  # fmt: skip
    return table


def matchers(questions) -> dict[str, AnswerMatcher]:
    """One `AnswerMatcher` per question id (any answer counts), for qrels extension."""
    return {item["id"]: AnswerMatcher.from_item(item) for item in questions.select_columns(["id", "output"])}


def question_inputs(questions, image_refs: Sequence[Any] | None = None) -> dict[str, list]:
    """Columns `id`, `input`, `image` of the questions as `data.tables.read_queries` reads them (`image_refs`
    replaces the file names, e.g. by feature-store keys or None)."""
    images = list(image_refs) if image_refs is not None else list(questions["image"])
    return {"id": list(questions["id"]), "input": list(questions["input"]), "image": images}


__all__ = [
    "GUARDS",
    "NEGATIVES_ORDERS",
    "add_relevance",
    "add_run_columns",
    "matchers",
    "qrels_from_column",
    "question_inputs",
    "viquae_columns",
]
