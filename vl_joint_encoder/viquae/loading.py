"""ViQuAE as its authors publish it: questions, articles and passages read as they are, and the passage -> article
join that gives each passage its image (see ``docs/viquae.md`` for the layout and its sources).

- Questions: the hub dataset ``PaulLerner/viquae_dataset`` (``{train,validation,test}.jsonl``), a ``save_to_disk``
  copy (a ``DatasetDict``, or one split), or a folder of ``{split}.jsonl`` files.
- Articles: ``PaulLerner/viquae_wikipedia`` (three ``.jsonl.gz`` files), a folder holding those three files, or a
  ``save_to_disk`` copy (the authors' ``viquae_wikipedia_recat``, or a ``DatasetDict`` of the three). They are put in
  the authors' order, ``non_humans, humans_with_faces, humans_without_faces`` (README "kb_recat"): a passage's
  ``index`` is a row of that concatenation. From the JSONL files only the columns asked for are parsed (title and
  image by default), with Arrow's JSON reader.
- Passages: ``PaulLerner/viquae_v4-alpha_passages`` or a ``save_to_disk`` copy: ``passage`` ("<title> [SEP] <text>")
  and ``index`` (the article's row). A passage's id is its row.

``ViquaeKnowledgeBase`` is a ``data.tables.KnowledgeBase`` whose passage image (or any other article column, e.g.
``clip-RN50``) is read through ``index`` from the article table, one cell per article: nothing is copied per
passage.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers.utils import logging

from ..data.references import resolved_path
from ..data.tables import ColumnMapping, KnowledgeBase, arrow_column, column_values, empty_text_rows, few


logger = logging.get_logger(__name__)

HUB_QUESTIONS = "PaulLerner/viquae_dataset"
HUB_ARTICLES = "PaulLerner/viquae_wikipedia"
HUB_PASSAGES = "PaulLerner/viquae_v4-alpha_passages"
SPLITS = ("train", "validation", "test")
# the hub's article files, and the order in which the authors concatenate them (README.rst, "kb_recat")
ARTICLE_FILES = ("humans_with_faces", "humans_without_faces", "non_humans")
RECAT_ORDER = ("non_humans", "humans_with_faces", "humans_without_faces")
ARTICLE_COLUMNS = ("wikipedia_title", "image")
SEP = " [SEP] "  # meerqat.data.loading.make_passage_item: f"{title} {sep_token} " with sep_token='[SEP]'
TITLE_MODES = ("keep", "replace", "title_column")
IMAGES_ENV = "VIQUAE_IMAGES_PATH"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def image_root(explicit: str | None = None) -> str | None:
    """The images folder: `explicit` (``--image_root``), else ``$VIQUAE_IMAGES_PATH`` (the authors' variable)."""
    return explicit if explicit else os.environ.get(IMAGES_ENV) or None


def is_hub_id(source: Any) -> bool:
    """A string that names no local path and looks like ``owner/name``."""
    return isinstance(source, str) and not os.path.exists(source) and bool(_HUB_ID.match(source))


def _from_hub(load, source: str, what: str):
    """`load()` of a hub dataset, a failure explained (a mistyped local path looks like a hub id too)."""
    try:
        return load()
    except Exception as error:  # datasets / huggingface_hub raise many types (offline, not found, network)
        raise ValueError(
            f"{what} {source!r} is no local path, and reading it as a hub dataset failed ({type(error).__name__}: "
            f"{str(error)[:300]}); check the path, or the hub id and the network (HF_HUB_OFFLINE)"
        ) from None


# ------------------------------------------------------------------------------------------------ questions
def load_questions(source: Any, splits: Sequence[str] = SPLITS):
    """`{split: datasets.Dataset}` of the questions (the splits of `splits` that the source has; at least one)."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        found = dict(source)
    elif isinstance(source, datasets.Dataset):
        found = {"test": source}
    elif is_hub_id(source):
        files = {split: f"{split}.jsonl" for split in splits}
        found = dict(_from_hub(lambda: datasets.load_dataset(source, data_files=files), source, "questions"))
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        path = os.fspath(source)
        jsonl = {split: os.path.join(path, f"{split}.jsonl") for split in splits}
        jsonl = {split: file for split, file in jsonl.items() if os.path.isfile(file)}
        if jsonl:
            found = dict(datasets.load_dataset("json", data_files=jsonl))
        elif os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(
            os.path.join(path, "dataset_info.json")
        ):
            loaded = datasets.load_from_disk(path)
            found = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {os.path.basename(path): loaded}
        else:
            raise ValueError(
                f"questions {path!r}: neither a save_to_disk folder nor a folder of {{train,validation,test}}.jsonl"
            )
    elif isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".jsonl"):
        found = {os.path.splitext(os.path.basename(source))[0]: datasets.load_dataset(
            "json", data_files=os.fspath(source), split="train")}
    else:
        raise ValueError(
            f"questions: cannot read {source!r}: give {HUB_QUESTIONS!r} (or another hub id), a save_to_disk copy, or "
            f"a folder of {{train,validation,test}}.jsonl"
        )
    questions = {split: found[split] for split in splits if split in found} or found
    for split, table in questions.items():
        missing = [c for c in ("id", "input", "output") if c not in table.column_names]
        if missing:
            raise ValueError(
                f"questions {source!r}, split {split!r}, lack the column(s) {missing} of viquae_dataset (it has "
                f"{table.column_names})"
            )
    return questions


# ------------------------------------------------------------------------------------------------ articles
def _json_articles(path: str, columns: Sequence[str]):
    """The `columns` of one JSON-lines file (gzipped or not), parsed by Arrow without building the other fields."""
    import pyarrow as pa
    import pyarrow.json as paj

    schema = pa.schema([(column, pa.string()) for column in columns])
    options = paj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        return paj.read_json(path, parse_options=options, read_options=paj.ReadOptions(block_size=32 << 20))
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"articles file {path!r} is not readable JSON lines with string {list(columns)} ({error})") from None


def load_articles(source: Any, columns: Sequence[str] = ARTICLE_COLUMNS):
    """
    The article table (a `datasets.Dataset`) in the authors' order, with `columns` (from a ``save_to_disk`` copy,
    any of its columns, e.g. ``clip-RN50``; from the JSONL files, string columns only).
    """
    import datasets
    import pyarrow as pa

    columns = list(dict.fromkeys(columns))
    if isinstance(source, datasets.Dataset):
        table = source
    elif isinstance(source, datasets.DatasetDict):
        table = _concatenate_recat(dict(source), "the articles")
    elif is_hub_id(source):
        from huggingface_hub import hf_hub_download

        paths = _from_hub(
            lambda: {name: hf_hub_download(source, f"{name}.jsonl.gz", repo_type="dataset") for name in ARTICLE_FILES},
            source, "articles",
        )  # fmt: skip
        table = datasets.Dataset(pa.concat_tables([_json_articles(paths[name], columns) for name in RECAT_ORDER]))
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        path = os.fspath(source)
        files = {name: [os.path.join(path, f"{name}{ext}") for ext in (".jsonl.gz", ".jsonl")] for name in ARTICLE_FILES}
        files = {name: next((p for p in candidates if os.path.isfile(p)), None) for name, candidates in files.items()}
        if all(files.values()):
            table = datasets.Dataset(pa.concat_tables([_json_articles(files[name], columns) for name in RECAT_ORDER]))
        elif any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "dataset_info.json")):
            loaded = datasets.load_from_disk(path)
            table = _concatenate_recat(dict(loaded), path) if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            missing = [f"{name}.jsonl.gz" for name, found in files.items() if found is None]
            raise ValueError(
                f"articles {path!r}: missing {missing} (the three files of {HUB_ARTICLES}), and not a save_to_disk copy"
            )
    else:
        raise ValueError(
            f"articles: cannot read {source!r}: give {HUB_ARTICLES!r}, a folder holding its three .jsonl.gz files, or "
            f"a save_to_disk copy (e.g. the authors' viquae_wikipedia_recat)"
        )
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"the articles {source!r} lack column(s) {missing}; they have {table.column_names}")
    return table.select_columns(columns) if set(table.column_names) != set(columns) else table


def _concatenate_recat(splits: Mapping[str, Any], name: str):
    import datasets

    if set(RECAT_ORDER) - set(splits):
        raise ValueError(f"{name}: a DatasetDict with splits {sorted(splits)}; expected {list(RECAT_ORDER)}")
    return datasets.concatenate_datasets([splits[split] for split in RECAT_ORDER])


# ------------------------------------------------------------------------------------------------ passages
def load_passages(source: Any):
    """The passages (`passage`, `index`) as a `datasets.Dataset`; a passage's id is its row."""
    import datasets

    if isinstance(source, datasets.Dataset):
        table = source
    elif is_hub_id(source):
        table = _from_hub(lambda: datasets.load_dataset(source, split="train"), source, "passages")
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        table = datasets.load_from_disk(os.fspath(source))
        if isinstance(table, datasets.DatasetDict):
            if len(table) != 1:
                raise ValueError(f"passages {source!r}: a DatasetDict with splits {list(table)}; expected one")
            table = next(iter(table.values()))
    else:
        raise ValueError(f"passages: cannot read {source!r}: give {HUB_PASSAGES!r} or a save_to_disk copy")
    missing = [c for c in ("passage", "index") if c not in table.column_names]
    if missing:
        raise ValueError(f"the passages {source!r} lack column(s) {missing}; they have {table.column_names}")
    return table


def raw_texts(passages, rows: Sequence[int]) -> list[str]:
    """The stored `passage` texts of `rows` (one Arrow read; a null passage reads "")."""
    rows = [int(r) for r in rows]
    if not rows:
        return []
    return [text or "" for text in passages.select_columns(["passage"])[rows]["passage"]]


# ------------------------------------------------------------------------------------------------ the join
class JoinedColumn(Sequence):
    """A passage-level view of an article-level column: ``column[i] = values[article_of[i]]``, nothing copied."""

    def __init__(self, values: Sequence, article_of: np.ndarray):
        self.values = values
        self.article_of = article_of

    def __len__(self) -> int:
        return len(self.article_of)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self.values[a] for a in self.article_of[row].tolist()]
        return self.values[int(self.article_of[row])]

    def __iter__(self):
        values = self.values
        return (values[a] for a in self.article_of.tolist())


class ArticlePassages(Mapping):
    """``article2passage``: article row -> the rows of its passages (ascending), from the passages' `index`, held
    as two arrays (a CSR layout) instead of a dict of 1.5M lists."""

    def __init__(self, article_of: np.ndarray, n_articles: int):
        self.order = np.argsort(article_of, kind="stable")
        counts = np.bincount(article_of, minlength=n_articles)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def __getitem__(self, article: int) -> list[int]:
        if not 0 <= int(article) < len(self.offsets) - 1:
            raise KeyError(article)
        return self.order[self.offsets[article] : self.offsets[article + 1]].tolist()

    def __iter__(self):
        return iter(np.flatnonzero(np.diff(self.offsets)).tolist())

    def __len__(self) -> int:
        return int(np.count_nonzero(np.diff(self.offsets)))


class ViquaeKnowledgeBase(KnowledgeBase):
    """
    The ViQuAE passages as a `KnowledgeBase`: ids are rows, texts are the `passage` column (title prefix handled by
    `title_mode`), and a passage's image reference is its article's (``articles[image_column][index]``). Built by
    `read_viquae_kb`.

    Besides the `KnowledgeBase` interface: `raw_texts(rows)` (the stored text, on which relevance is decided),
    `article_of` (the `index` column), `article_column(name)` (a passage-level view of an article column),
    `title2index` and `article2passage` (the authors' two maps).
    """

    def __init__(self, passages, articles, article_of: np.ndarray, image_refs: Sequence | None,
                 title_mode: str = "keep", title_separator: str = ". ", title_column: str = "wikipedia_title",
                 name: str = "the ViQuAE passages"):  # fmt: skip
        super().__init__(passages, ColumnMapping(passage_id=None, passage_text="passage", passage_image=None), None)
        self.articles = articles
        self.article_of = article_of
        self.article_images = image_refs  # one reference per article, or None
        self.title_mode = title_mode
        self.title_separator = title_separator
        self.title_column = title_column
        self.name = name
        self._title2index = None
        self._article2passage = None

    # --- the KnowledgeBase interface
    @property
    def image_column(self) -> str | None:
        return "image" if self.article_images is not None else None

    def images(self) -> Sequence | None:
        if self.article_images is None or all(image is None for image in self.article_images):
            return None
        return JoinedColumn(self.article_images, self.article_of)

    def count_images(self) -> int:
        """Passages whose article has an image (a numpy count over the join, no Python object per passage)."""
        if self.article_images is None:
            return 0
        has_image = np.fromiter((image is not None for image in self.article_images), dtype=bool,
                                count=len(self.article_images))  # fmt: skip
        return int(np.count_nonzero(has_image[self.article_of]))

    def passages(self, rows: Sequence[int]) -> tuple[list[str], list[Any]]:
        rows = [int(r) for r in rows]
        texts = self._model_texts(self.raw_texts(rows), rows)
        images = [None] * len(rows)
        if self.article_images is not None:
            images = [self.article_images[a] for a in self.article_of[rows].tolist()]
        return texts, images

    # --- ViQuAE
    def raw_texts(self, rows: Sequence[int]) -> list[str]:
        """The passages as stored ("<title> [SEP] <text>"): what BM25 indexes and answer matching reads."""
        return raw_texts(self.table, rows)

    def _model_texts(self, texts: list[str], rows: Sequence[int]) -> list[str]:
        if self.title_mode == "keep":
            return texts
        if self.title_mode == "replace":
            return [text.replace(SEP, self.title_separator, 1) for text in texts]
        titles = self.article_column(self.title_column)
        out = []
        for text, row in zip(texts, rows):
            head, sep, tail = text.partition(SEP)
            title = titles[row]
            out.append(f"{title}{self.title_separator}{tail if sep else text}" if title else (tail if sep else text))
        return out

    def article_column(self, name: str) -> JoinedColumn:
        """A passage-level view of the article column `name` (e.g. `wikipedia_title`, `clip-RN50`)."""
        if name not in self.articles.column_names:
            raise ValueError(f"the articles have no column {name!r}; they have {self.articles.column_names}")
        return JoinedColumn(column_values(self.articles, name), self.article_of)

    @property
    def title2index(self) -> dict[str, int]:
        """Article title -> article row; a title seen twice keeps its last row, as meerqat's ``loading.py map
        --inverse`` does."""
        if self._title2index is None:
            titles = column_values(self.articles, "wikipedia_title")
            self._title2index = {title: row for row, title in enumerate(titles)}
        return self._title2index

    @property
    def article2passage(self) -> ArticlePassages:
        if self._article2passage is None:
            self._article2passage = ArticlePassages(self.article_of, len(self.articles))
        return self._article2passage


def read_viquae_kb(
    passages: Any,
    articles: Any,
    image_column: str | None = "image",
    image_refs: Sequence | None = None,
    title_mode: str = "keep",
    title_separator: str = ". ",
    title_column: str = "wikipedia_title",
    check_titles: int = 1000,
) -> ViquaeKnowledgeBase:
    """
    Read and check the passages and their articles.

    Args:
        passages / articles: anything `load_passages` / `load_articles` accept (or already loaded Datasets).
        image_column: the article column of image references (file names under the images folder); None: no image.
        image_refs: one reference per article instead of `image_column` (e.g. keys of a feature store, None where
            an article has no vector).
        title_mode: ``keep`` the stored "<title> [SEP] <text>"; ``replace`` " [SEP] " by `title_separator` (T5 and
            BART tokenizers cut "[SEP]" into ordinary pieces); ``title_column``: the text without its prefix,
            after the article's `title_column` and `title_separator`.
        check_titles: how many passages (spread over the KB) must carry their article's title as prefix (0: no
            check). It fails when the passages' `index` refers to another article table.

    Raises:
        ValueError: a passage `index` outside the articles (rows and fix named); passages whose prefix is not their
            article's title; empty passages without an image.
    """
    if title_mode not in TITLE_MODES:
        raise ValueError(f"title_mode must be one of {TITLE_MODES}, got {title_mode!r}")
    name = passages if isinstance(passages, str) else "the ViQuAE passages"
    columns = ["wikipedia_title"] + [c for c in (image_column, title_column) if c and c != "wikipedia_title"]
    passages = load_passages(passages)
    articles = load_articles(articles, columns=list(dict.fromkeys(columns)))
    if len(passages) == 0:
        raise ValueError(f"{name} is empty")
    if "index" not in passages.column_names:
        raise ValueError(f"{name} has no `index` column (the article row of each passage); it has "
                         f"{passages.column_names}: pass the ViQuAE passages ({HUB_PASSAGES!r} layout)")
    index = arrow_column(passages, "index")  # read through Arrow: a `datasets` Column read row by row costs hours here
    if index.null_count:
        raise ValueError(f"{index.null_count} passages of {name} have a null `index` (article row): every passage "
                         f"needs its article")
    article_of = np.asarray(index.to_numpy(), dtype=np.int64)
    bad = np.flatnonzero((article_of < 0) | (article_of >= len(articles)))
    if len(bad):
        raise ValueError(
            f"{len(bad)} passages of {name} have an `index` outside the {len(articles)} articles (rows "
            f"{few(bad.tolist())}, index {few(article_of[bad].tolist())}): `index` is a row of the concatenation "
            f"{list(RECAT_ORDER)} of {HUB_ARTICLES}; pass the article files the passages were built from"
        )
    if image_refs is None and image_column is not None:
        image_refs = column_values(articles, image_column)
    if image_refs is not None and len(image_refs) != len(articles):
        raise ValueError(f"image_refs has {len(image_refs)} entries for {len(articles)} articles")
    kb = ViquaeKnowledgeBase(
        passages, articles, article_of, image_refs, title_mode, title_separator, title_column, name
    )
    if check_titles:
        _check_titles(kb, check_titles)
    empty = empty_text_rows(passages, "passage")
    if len(empty):
        images = kb.article_images
        empty = [int(r) for r in empty if images is None or images[int(article_of[r])] is None]
        if empty:
            raise ValueError(f"{len(empty)} passages of {name} have an empty text and no image (rows {few(empty)})")
    return kb


def _check_titles(kb: ViquaeKnowledgeBase, n: int) -> None:
    rows = np.unique(np.linspace(0, len(kb) - 1, num=min(n, len(kb))).astype(np.int64)).tolist()
    titles = kb.article_column("wikipedia_title")
    wrong = [(r, text.partition(SEP)[0], titles[r]) for r, text in zip(rows, kb.raw_texts(rows))
             if SEP in text and text.partition(SEP)[0] != titles[r]]  # fmt: skip
    if len(wrong) > len(rows) // 100:  # a title edited since the passages were cut is tolerated, a shifted join not
        shown = "; ".join(f"row {r}: prefix {p!r}, article {t!r}" for r, p, t in wrong[:3])
        raise ValueError(
            f"{len(wrong)} of {len(rows)} checked passages of {kb.name} do not start with their article's title "
            f"({shown}): their `index` refers to another article table than the one given (order "
            f"{list(RECAT_ORDER)} expected). Pass the articles the passages were built from, or check_titles=0"
        )


# ------------------------------------------------------------------------------------------------ images
def check_images(
    references: Sequence, root: str | None, names: Sequence[str], what: str, on_missing: str = "error"
) -> list:
    """
    References (file names) whose file is missing under `root`: an error naming a few (``on_missing="error"``), or
    None in their place with a warning that counts them (``"skip"``: text-only from then on). Each distinct name is
    checked once (1.5M articles, not 11.9M passages).
    """
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    exists: dict[str, bool] = {}
    out, missing = [], []
    for name, reference in zip(names, references):
        if isinstance(reference, str):
            if reference not in exists:
                exists[reference] = os.path.isfile(resolved_path(reference, root))
            if not exists[reference]:
                missing.append((name, reference))
                reference = None
        out.append(reference)
    if missing and on_missing == "error":
        shown = ", ".join(f"{n}: {r!r}" for n, r in missing[:5])
        raise ValueError(
            f"{len(missing)} {what} reference image files missing under {root!r} (e.g. {shown}): pass the images "
            f"folder (--image_root, or ${IMAGES_ENV}), or --on_missing_image skip to use them without image"
        )
    if missing:
        logger.warning(f"{len(missing)} {what} have no image file under {root!r} and are used without image")
    return out


__all__ = [
    "ARTICLE_FILES",
    "HUB_ARTICLES",
    "HUB_PASSAGES",
    "HUB_QUESTIONS",
    "IMAGES_ENV",
    "RECAT_ORDER",
    "SEP",
    "SPLITS",
    "TITLE_MODES",
    "ArticlePassages",
    "JoinedColumn",
    "ViquaeKnowledgeBase",
    "check_images",
    "image_root",
    "is_hub_id",
    "load_articles",
    "load_passages",
    "load_questions",
    "raw_texts",
    "read_viquae_kb",
]
