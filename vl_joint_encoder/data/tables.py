"""Queries and knowledge base (KB): the one reader and validator every job uses (training, encoding, search,
evaluation, data-report).

Generic format (a `datasets.Dataset`, a list of dicts, JSONL / JSON / Parquet / CSV files, or a `save_to_disk`
folder):

- queries: `id` (str or int, unique), `question` (str), optional `image`, `positive_ids` (list of KB ids), optional
  `negative_ids` (hard negatives, e.g. mined by BM25).
- KB: `id` (str or int, unique), `text` (str), optional `title`, optional `image` (multimodal passages: an entity's
  image with its text).

An `image` value is any image reference `data.references` resolves: a path to an image file (relative to
`image_root`), a PIL image, a `datasets.Image` cell, a key of a feature store, a path to a `.npy` / `.npz` /
`.safetensors` feature file, or an inline array (V, feat_dim). Images are never decoded here: batches load them lazily.

Columns are named by a `ColumnMapping`; `None` for an id column means "the row position".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from transformers.utils import logging


logger = logging.get_logger(__name__)

MISSING_POSITIVE_ACTIONS = ("skip", "error")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class ColumnMapping:
    """
    Which columns hold what. `None` for an id column means "the row position"; an optional column (`query_image`,
    `negative_ids`, `passage_title`, `passage_image`) absent from the data is simply not used.

    Args:
        query_id: query id column (`None`: row position).
        question: question text column.
        query_image: query image column (optional).
        positive_ids: column of relevant KB ids (list per query).
        negative_ids: column of hard-negative KB ids (optional).
        passage_id: KB id column (`None`: row position). If the column is absent and `passage_id_fallback_to_row`,
            row positions are used.
        passage_text: passage text column.
        passage_title: optional title column, prepended to the text as "title. text".
        passage_image: passage image column (optional).
        passage_id_fallback_to_row: see `passage_id`.
    """

    query_id: str | None = "id"
    question: str = "question"
    query_image: str | None = "image"
    positive_ids: str = "positive_ids"
    negative_ids: str | None = "negative_ids"
    passage_id: str | None = "id"
    passage_text: str = "text"
    passage_title: str | None = None
    passage_image: str | None = "image"
    passage_id_fallback_to_row: bool = False

    @classmethod
    def viquae(cls, positives: str = "provenance_indices", negatives: str | None = "BM25_irrelevant_indices"):
        """ViQuAE columns: `input`, `image`, `positives` (e.g. `BM25_provenance_indices`), `negatives`; passages
        `passage` with `index` (row positions)."""
        return cls(
            query_id="id",
            question="input",
            query_image="image",
            positive_ids=positives,
            negative_ids=negatives,
            passage_id="index",
            passage_text="passage",
            passage_image=None,
            passage_id_fallback_to_row=True,
        )

    def with_overrides(self, **overrides: str | None) -> ColumnMapping:
        """A copy with the given fields replaced (`None` values are ignored: "keep the preset's column")."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown column role(s) {unknown}; roles are {sorted(known)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return type(self)(**values)


# ------------------------------------------------------------------------------------------------ loading
def load_table(source: Any, name: str = "data"):
    """A `datasets.Dataset` from a Dataset, a DatasetDict with one split, a list of dicts, a dict of columns, a
    JSONL/JSON/Parquet/CSV file (or a list of them), or a folder written by `save_to_disk`."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        if len(source) != 1:
            raise ValueError(f"{name}: a DatasetDict with splits {list(source)} was given; pass one split, e.g. ds['train']")
        return next(iter(source.values()))
    if isinstance(source, list) and (not source or isinstance(source[0], Mapping)):
        return datasets.Dataset.from_list(source)
    if isinstance(source, Mapping):
        return datasets.Dataset.from_dict(dict(source))
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    paths = [os.fspath(p) for p in paths]
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{name}: {path!r} does not exist")
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return load_table(datasets.load_from_disk(paths[0]), name)
    suffixes = {os.path.splitext(p)[1].lower() for p in paths}
    if len(suffixes) != 1 or next(iter(suffixes)) not in TABLE_SUFFIXES:
        raise ValueError(
            f"{name}: cannot read {paths}: give .jsonl/.json, .parquet or .csv files (one kind), a save_to_disk folder, "
            f"or a datasets.Dataset"
        )
    return datasets.load_dataset(TABLE_SUFFIXES[suffixes.pop()], data_files=paths, split="train")


def undecoded_images(dataset, column: str | None):
    """Keep `datasets.Image` cells undecoded ({'bytes', 'path'}) so that images load at batch time only."""
    import datasets

    if column is not None and column in dataset.column_names:
        feature = dataset.features[column]
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def require_columns(dataset, columns: Mapping[str, str | None], name: str) -> None:
    """Raise a ValueError naming every role whose column is missing, and the columns the table has."""
    missing = {role: col for role, col in columns.items() if col is not None and col not in dataset.column_names}
    if missing:
        described = ", ".join(f"{role}={col!r}" for role, col in missing.items())
        raise ValueError(
            f"{name} lacks column(s) {described}; it has {dataset.column_names}. Map your columns with "
            f"ColumnMapping(...) (CLI: --question_column etc.), or use ColumnMapping.viquae() for ViQuAE data"
        )


def few(items: Sequence, n: int = 5) -> str:
    """`'a', 'b', ... (12 in all)`: a few items of a list for an error message."""
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def id_list(value: Any) -> list:
    """A cell of an id-list column as a list (a scalar id becomes a one-element list, None an empty one)."""
    if value is None:
        return []
    if isinstance(value, (str, int, np.integer)):
        return [value]
    return list(value)


def _unique_ids(values: list, column: str, name: str, what: str, fix: str) -> list[str]:
    """`values` as strings, refusing null and duplicate ids (both would silently merge two rows downstream)."""
    nulls = [row for row, value in enumerate(values) if value is None]
    if nulls:
        raise ValueError(
            f"{name} has {len(nulls)} null id(s) in column {column!r} (rows {few(nulls)}): every row needs an id"
        )
    ids = [str(value) for value in values]
    seen: set[str] = set()
    duplicates = sorted({i for i in ids if i in seen or seen.add(i)})
    if duplicates:
        raise ValueError(
            f"{name} has {len(duplicates)} duplicate {what} ids, e.g. {few(duplicates)} (column {column!r}): {fix}"
        )
    return ids


def empty_text_rows(dataset, column: str) -> np.ndarray:
    """Rows whose text is null or only whitespace, computed by Arrow over the (memory-mapped) column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = dataset.with_format("arrow")[column] if dataset._indices is not None else dataset.data.column(column)
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        values = pc.cast(values, pa.string())
    empty = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0))
    return np.flatnonzero(pc.fill_null(empty, True).to_numpy(zero_copy_only=False))


# ------------------------------------------------------------------------------------------------ the KB
class KnowledgeBase:
    """
    A validated KB: `len(kb)` passages, `ids` (KB id of each row, or None when ids are the row positions),
    `row_of(id)`, and `passages(rows)` -> (texts, image references) in one Arrow read. Built by `read_knowledge_base`.
    """

    def __init__(self, table, mapping: ColumnMapping, ids: list[str] | None, index: dict[str, int] | None):
        self.table = table
        self.mapping = mapping
        self.ids = ids
        self.index = index

    def __len__(self) -> int:
        return len(self.table)

    @property
    def image_column(self) -> str | None:
        """The passage image column, if the KB has one."""
        column = self.mapping.passage_image
        return column if column is not None and column in self.table.column_names else None

    @property
    def has_images(self) -> bool:
        return self.image_column is not None

    def passage_ids(self) -> list[str]:
        """The id of every passage, in row order (`str(row)` when ids are the row positions)."""
        return self.ids if self.ids is not None else [str(row) for row in range(len(self))]

    def id_of(self, row: int) -> str:
        return self.ids[row] if self.ids is not None else str(row)

    def row_of(self, value: Any) -> int | None:
        """The row of KB id `value`, or None when it is not in the KB."""
        if self.index is None:
            try:
                row = int(value)
            except (TypeError, ValueError):
                return None
            return row if 0 <= row < len(self) else None
        return self.index.get(str(value))

    def passages(self, rows: Sequence[int]) -> tuple[list[str], list[Any]]:
        """Texts (title prefixed when a title column is mapped) and raw image references of KB rows."""
        batch = self.table[list(map(int, rows))]
        texts = [str(t) if t is not None else "" for t in batch[self.mapping.passage_text]]
        title = self.mapping.passage_title
        if title is not None:
            texts = [f"{head}. {text}" if head else text for head, text in zip(batch[title], texts)]
        images = batch[self.image_column] if self.has_images else [None] * len(texts)
        return texts, images

    def images(self) -> list[Any] | None:
        """Every passage's image reference, or None when the KB has no image column (or only null cells)."""
        if not self.has_images:
            return None
        images = self.table[self.image_column]
        return None if all(image is None for image in images) else images

    def texts(self) -> Sequence[str]:
        """Every passage's text (title prefixed), in row order."""
        column = self.mapping.passage_text
        if self.mapping.passage_title is None and self.table.data.column(column).null_count == 0:
            return self.table[column]
        return self.passages(range(len(self)))[0]  # titles joined, null texts (of image passages) as ""


def read_knowledge_base(
    source: Any, mapping: ColumnMapping | None = None, name: str = "the KB", check_texts: bool = True
) -> KnowledgeBase:
    """
    Read and validate a KB (anything `load_table` accepts, or a `KnowledgeBase`, returned as is).

    Raises:
        ValueError: an empty KB; a missing text / id / title column; null or duplicate ids; passages with an empty
            text and no image (unless `check_texts=False`, for reports that count them).
    """
    if isinstance(source, KnowledgeBase):
        return source
    mapping = mapping or ColumnMapping()
    table = undecoded_images(load_table(source, name), mapping.passage_image)
    if len(table) == 0:
        raise ValueError(f"{name} is empty: nothing to encode or search (check the file / split you passed)")
    require_columns(table, {"passage_text": mapping.passage_text, "passage_title": mapping.passage_title}, name)
    ids, index = None, None
    column = mapping.passage_id
    if column is not None and column not in table.column_names:
        if not mapping.passage_id_fallback_to_row:
            require_columns(table, {"passage_id": column}, name)
        column = None
    if column is not None:
        values = table[column]
        if all(isinstance(v, (int, np.integer)) for v in values) and np.array_equal(
            np.asarray(values), np.arange(len(values))
        ):
            pass  # ids are the row positions: no index needed
        else:
            ids = _unique_ids(
                values, column, name, "passage", "every passage needs a unique id (deduplicate the KB, or map passage_id=None "
                "to identify passages by row position)"
            )
            index = {passage_id: row for row, passage_id in enumerate(ids)}
    kb = KnowledgeBase(table, mapping, ids, index)
    empty_rows = empty_text_rows(table, mapping.passage_text) if check_texts else ()
    if len(empty_rows):
        images = kb.images()
        empty = [kb.id_of(int(r)) for r in empty_rows if images is None or images[int(r)] is None]
        if empty:
            raise ValueError(
                f"{len(empty)} passages of {name} have an empty text and no image (ids {few(empty)}): drop them "
                f"or fill their text (column {mapping.passage_text!r})"
            )
    return kb


# ------------------------------------------------------------------------------------------------ queries
@dataclass
class Queries:
    """Validated queries: ids (str), questions, image references (or None: no image column), and the raw positive /
    negative id lists (or None when the columns are absent)."""

    ids: list[str]
    questions: list[str]
    images: list[Any] | None
    positive_ids: list[list] | None
    negative_ids: list[list] | None
    mapping: ColumnMapping
    table: Any = field(repr=False, default=None)

    def __len__(self) -> int:
        return len(self.ids)


def read_queries(
    source: Any, mapping: ColumnMapping | None = None, need_positives: bool = False, name: str = "the queries"
) -> Queries:
    """
    Read and validate queries (anything `load_table` accepts, or `Queries`, returned as is).

    Raises:
        ValueError: no query; a missing question / id column (or positives column when `need_positives`); null or
            duplicate ids; queries with an empty question and no image.
    """
    if isinstance(source, Queries):
        return source
    mapping = mapping or ColumnMapping()
    table = undecoded_images(load_table(source, name), mapping.query_image)
    if len(table) == 0:
        raise ValueError(f"{name}: no query (check the file / split you passed)")
    require_columns(
        table,
        {"question": mapping.question, "query_id": mapping.query_id,
         "positive_ids": mapping.positive_ids if need_positives else None},
        name,
    )
    n = len(table)
    if mapping.query_id is not None:
        ids = _unique_ids(table[mapping.query_id], mapping.query_id, name, "query", "query ids must be unique")
    else:
        ids = [str(row) for row in range(n)]
    questions = ["" if q is None else str(q) for q in table[mapping.question]]
    images = None
    if mapping.query_image is not None and mapping.query_image in table.column_names:
        images = table[mapping.query_image]
    empty = [ids[r] for r, q in enumerate(questions) if not q.strip() and (images is None or images[r] is None)]
    if empty:
        raise ValueError(f"{len(empty)} of {name} have an empty question and no image: {few(empty)}")
    has_positives = mapping.positive_ids in table.column_names
    has_negatives = mapping.negative_ids is not None and mapping.negative_ids in table.column_names
    return Queries(
        ids=ids,
        questions=questions,
        images=images,
        positive_ids=[id_list(v) for v in table[mapping.positive_ids]] if has_positives else None,
        negative_ids=[id_list(v) for v in table[mapping.negative_ids]] if has_negatives else None,
        mapping=mapping,
        table=table,
    )


def qrels_from_queries(queries: Queries, kb: KnowledgeBase) -> dict[str, dict[str, int]]:
    """`{query id: {passage id: 1}}` from the queries' positives, in the KB's ids (row positions as strings when the
    KB is identified by rows). Raises when a positive is not in the KB."""
    if queries.positive_ids is None:
        raise ValueError(
            f"the queries have no {queries.mapping.positive_ids!r} column: give qrels, or queries with their relevant "
            f"KB ids"
        )
    qrels, missing = {}, []
    for query_id, positives in zip(queries.ids, queries.positive_ids):
        rows = [kb.row_of(value) for value in positives]
        missing += [(query_id, value) for value, row in zip(positives, rows) if row is None]
        qrels[query_id] = {kb.id_of(row): 1 for row in rows if row is not None}
    if missing:
        raise ValueError(_missing_ids_message(missing, kb.mapping))
    return qrels


def _missing_ids_message(missing: list[tuple[str, Any]], mapping: ColumnMapping) -> str:
    shown = ", ".join(f"{q!r}->{p!r}" for q, p in missing[:5])
    return (
        f"{len(missing)} positive/negative passage ids of the queries are not in the KB (query->id: {shown}"
        f"{', ...' if len(missing) > 5 else ''}); check that the KB is the one the ids refer to "
        f"(passage id column {mapping.passage_id!r})"
    )


# ------------------------------------------------------------------------------------------------ training data
@dataclass
class DataStats:
    """What `prepare_training_data` found; logged, and written into the model card."""

    n_queries_in: int = 0
    n_queries: int = 0
    n_skipped_no_positive: int = 0
    n_passages: int = 0
    n_query_images: int = 0
    n_passage_images: int = 0
    positives_per_query: list[int] = field(default_factory=list)
    negatives_per_query: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        pos = np.asarray(self.positives_per_query or [0])
        neg = np.asarray(self.negatives_per_query or [0])
        return {
            "queries": self.n_queries,
            "queries_skipped_without_positive": self.n_skipped_no_positive,
            "passages": self.n_passages,
            "queries_with_image": self.n_query_images,
            "passages_with_image": self.n_passage_images,
            "positives_per_query_mean": float(pos.mean()),
            "hard_negatives_per_query_mean": float(neg.mean()),
        }


@dataclass
class PreparedData:
    """
    Validated training data. `queries` has the columns the collator reads: `query_id` (str), `question`, `image`
    (raw reference or None), `positive_rows`, `negative_rows` (KB row positions, int64). `kb` is the
    `KnowledgeBase` (images not decoded); `passages(rows)` reads passages.
    """

    queries: Any  # datasets.Dataset
    kb: KnowledgeBase
    mapping: ColumnMapping
    stats: DataStats

    @property
    def kb_ids(self) -> list[str] | None:
        return self.kb.ids

    @property
    def has_passage_images(self) -> bool:
        return self.kb.has_images

    def passages(self, rows: Sequence[int]) -> tuple[list[str], list[Any]]:
        """Texts and raw image references of KB rows (one Arrow read)."""
        return self.kb.passages(rows)


def prepare_training_data(
    queries: Any,
    kb: Any,
    mapping: ColumnMapping | None = None,
    on_missing_positive: str = "skip",
) -> PreparedData:
    """
    Read and validate queries + KB (see the module docstring for the format) and map positives / negatives to KB
    rows.

    Args:
        queries / kb: anything `load_table` accepts (or already read `Queries` / `KnowledgeBase`).
        mapping: column names (default: the generic format; `ColumnMapping.viquae()` for ViQuAE).
        on_missing_positive: `"skip"` drops queries without a positive (and logs how many), `"error"` raises.

    Raises:
        ValueError: missing columns, null or duplicate ids, ids absent from the KB (a few listed), empty questions or
            passage texts (without an image), queries without positives when `on_missing_positive="error"`.
    """
    import datasets

    mapping = mapping or ColumnMapping()
    if on_missing_positive not in MISSING_POSITIVE_ACTIONS:
        raise ValueError(f"on_missing_positive must be one of {MISSING_POSITIVE_ACTIONS}, got {on_missing_positive!r}")
    queries = read_queries(queries, mapping, need_positives=True)
    kb = read_knowledge_base(kb, mapping)
    if queries.negative_ids is None and mapping.negative_ids is not None:
        logger.info(f"queries have no {mapping.negative_ids!r} column: negatives come from the batch and random passages")
    n = len(queries)
    images = queries.images if queries.images is not None else [None] * n
    negatives = queries.negative_ids if queries.negative_ids is not None else [[] for _ in range(n)]
    kb_images = kb.images()
    stats = DataStats(n_queries_in=n, n_passages=len(kb))
    stats.n_passage_images = sum(image is not None for image in kb_images) if kb_images is not None else 0
    columns = {"query_id": [], "question": [], "image": [], "positive_rows": [], "negative_rows": [], "query_row": []}
    missing_ids, no_positive = [], []
    for row in range(n):
        query_id = queries.ids[row]
        pos_rows, neg_rows = [], []
        for values, rows in ((queries.positive_ids[row], pos_rows), (negatives[row], neg_rows)):
            for value in values:
                r = kb.row_of(value)
                (missing_ids.append((query_id, value)) if r is None else rows.append(r))
        if not pos_rows:
            no_positive.append(query_id)
            continue
        pos_rows = list(dict.fromkeys(pos_rows))
        positive_set = set(pos_rows)
        neg_rows = [r for r in dict.fromkeys(neg_rows) if r not in positive_set]
        columns["query_id"].append(query_id)
        columns["question"].append(queries.questions[row])
        columns["image"].append(images[row])
        columns["positive_rows"].append(pos_rows)
        columns["negative_rows"].append(neg_rows)
        columns["query_row"].append(row)
        stats.positives_per_query.append(len(pos_rows))
        stats.negatives_per_query.append(len(neg_rows))
        stats.n_query_images += images[row] is not None

    if missing_ids:
        raise ValueError(_missing_ids_message(missing_ids, mapping))
    if no_positive:
        if on_missing_positive == "error":
            raise ValueError(
                f"{len(no_positive)} of {n} queries have no positive passage ({few(no_positive)}): fix the data, or "
                f"pass on_missing_positive='skip' to train without them"
            )
        logger.warning(f"skipping {len(no_positive)} of {n} queries without a positive passage ({few(no_positive)})")
    stats.n_skipped_no_positive = len(no_positive)
    stats.n_queries = len(columns["query_id"])
    if stats.n_queries == 0:
        raise ValueError(f"no query with a positive passage among {n}: nothing to train on")

    features = datasets.Features(
        {
            "query_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "positive_rows": datasets.Sequence(datasets.Value("int64")),
            "negative_rows": datasets.Sequence(datasets.Value("int64")),
            "query_row": datasets.Value("int64"),
        }
    )
    image_column = columns.pop("image")
    prepared = datasets.Dataset.from_dict(columns, features=features)
    image_feature = None
    if queries.images is not None and isinstance(queries.table.features[mapping.query_image], datasets.Image):
        image_feature = queries.table.features[mapping.query_image]
    if image_feature is not None:
        prepared = prepared.add_column("image", image_column, feature=image_feature)
    elif any(image is not None for image in image_column):
        prepared = prepared.add_column("image", _storable_references(image_column))
    else:
        prepared = prepared.add_column("image", [None] * len(prepared), feature=datasets.Value("string"))
    logger.info(f"training data: {stats.summary()}")
    return PreparedData(queries=prepared, kb=kb, mapping=mapping, stats=stats)


def _storable_references(values: list) -> list:
    """Image references that Arrow can store: strings and cells stay, arrays become nested lists."""
    return [value.tolist() if isinstance(value, np.ndarray) else value for value in values]


__all__ = [
    "ColumnMapping",
    "DataStats",
    "KnowledgeBase",
    "PreparedData",
    "Queries",
    "load_table",
    "prepare_training_data",
    "qrels_from_queries",
    "read_knowledge_base",
    "read_queries",
]
