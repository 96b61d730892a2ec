"""What the model reads of ViQuAE: the knowledge base with its passage images, the question images, and, with
global image vectors, the feature store that resolves both. One place for the choices every ViQuAE job shares
(training, search, mining): image files or vectors or none, missing images, title handling."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers.utils import logging

from ..data.tables import column_values
from .features import GlobalVectorStore
from .loading import ViquaeKnowledgeBase, check_images, load_articles, read_viquae_kb


logger = logging.get_logger(__name__)


@dataclass
class ViquaeInputs:
    """The KB, the feature store (None unless global vectors are used) and each split's question image references
    (None: text-only questions)."""

    kb: ViquaeKnowledgeBase
    feature_store: GlobalVectorStore | None
    question_images: dict[str, list | None]

    def queries(self, questions, split: str, id_columns: Mapping[str, str] | None = None):
        """The questions of `split` as the package's query table: `id`, `input`, `image` (this split's references),
        and `{name: source column}` of `id_columns` (passage-row lists, e.g. positives under the mapping's name)."""
        import datasets

        columns = {"id": column_values(questions, "id"), "input": column_values(questions, "input")}
        images = self.question_images.get(split)
        columns["image"] = images if images is not None else [None] * len(questions)
        for name, source in (id_columns or {}).items():
            columns[name] = [list(map(int, v)) for v in column_values(questions, source)]
        features = {"id": datasets.Value("string"), "input": datasets.Value("string"),
                    "image": datasets.Value("string"),
                    **{name: datasets.List(datasets.Value("int64")) for name in (id_columns or {})}}  # fmt: skip
        return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def build_inputs(
    passages: Any,
    articles: Any,
    questions: Mapping[str, Any],
    image_root: str | None = None,
    use_images: bool = True,
    vectors_column: str | None = None,
    vectors_folder: str | None = None,
    title_mode: str = "keep",
    title_separator: str = ". ",
    title_column: str = "wikipedia_title",
    on_missing_image: str = "error",
    check_titles: int = 1000,
) -> ViquaeInputs:
    """
    Args:
        passages / articles / questions: as `loading` reads them (`questions`: `{split: Dataset}`).
        image_root: the images folder (file-name images).
        use_images: False: no image on either side (the text-only system).
        vectors_column: global vectors from this column of the articles and of the questions (e.g. ``clip-RN50``),
            one visual token each; or `vectors_folder`: the ``pooled`` vectors of an extract-features folder (its
            image ids are file names without extension; an image file name is matched as given, then without it).
        on_missing_image: ``error`` or ``skip`` (the passage / question is then used without image).
    """
    if vectors_column and vectors_folder:
        raise ValueError("give one source of image vectors: a column or an extract-features folder")
    columns = ["wikipedia_title", "image"] + [c for c in (vectors_column, title_column) if c]
    articles = load_articles(articles, columns=list(dict.fromkeys(columns)))
    common = dict(title_mode=title_mode, title_separator=title_separator, title_column=title_column,
                  check_titles=check_titles)
    if not use_images:
        kb = read_viquae_kb(passages, articles, image_column=None, **common)
        return ViquaeInputs(kb, None, {split: None for split in questions})
    names = column_values(articles, "image")
    if vectors_column or vectors_folder:
        if vectors_column:
            tables = [(articles, "image", vectors_column)]
            tables += [(table, "image", vectors_column) for table in questions.values()]
            store = GlobalVectorStore.from_tables(tables)
        else:
            store = GlobalVectorStore.from_extracted(vectors_folder)
        article_refs = [_key(store, name) for name in names]
        question_images = {split: [_key(store, name) for name in column_values(table, "image")]
                           for split, table in questions.items()}  # fmt: skip
        for what, refs in [("articles", article_refs), *question_images.items()]:
            missing = sum(ref is None for ref in refs)
            if missing:
                logger.warning(f"{missing} of {len(refs)} {what} have no image vector: used without image")
        kb = read_viquae_kb(passages, articles, image_refs=article_refs, **common)
        return ViquaeInputs(kb, store, question_images)
    titles = column_values(articles, "wikipedia_title")
    article_refs = check_images(names, image_root, titles, "articles", on_missing_image)
    question_images = {
        split: check_images(column_values(table, "image"), image_root, column_values(table, "id"),
                            f"{split} questions", on_missing_image)
        for split, table in questions.items()
    }
    kb = read_viquae_kb(passages, articles, image_refs=article_refs, **common)
    return ViquaeInputs(kb, None, question_images)


def _key(store: GlobalVectorStore, name: str | None) -> str | None:
    """The store key of an image file name: the name itself, or (extract-features ids) the name without extension."""
    if name is None:
        return None
    if name in store:
        return name
    stem = name.rsplit(".", 1)[0]
    return stem if stem in store else None


__all__ = ["ViquaeInputs", "build_inputs"]
