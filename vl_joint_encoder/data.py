"""Training data for the retriever: queries (question + image + relevant passage ids) and a knowledge base (KB).

Generic format (a `datasets.Dataset`, a list of dicts, or JSONL / JSON / Parquet files, or a `save_to_disk` folder):

- queries: `id` (str or int), `question` (str), optional `image`, `positive_ids` (list of KB ids), optional
  `negative_ids` (hard negatives, e.g. mined by BM25).
- KB: `id` (str or int, unique), `text` (str), optional `image` (multimodal passages: an entity's image with its text).

An `image` value is any of: a path to an image file (relative to `image_root`), a PIL image, a `datasets.Image` cell,
a key of a feature store (precomputed visual features, see `load_feature_store`), a path to a `.npy` / `.npz` /
`.safetensors` feature file, or an inline array (V, feat_dim). Images are never decoded here: the collator loads them
lazily, batch by batch.

ViQuAE (Lerner et al., SIGIR 2022) is read as it is with `ColumnMapping.viquae()`: questions `input`, `image`,
`<system>_provenance_indices` as positives, `<system>_irrelevant_indices` as hard negatives; passages `passage`, `index`
(ViQuAE's passage indices are row positions in the passage dataset).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers.utils import logging


logger = logging.get_logger(__name__)

MISSING_POSITIVE_ACTIONS = ("skip", "error")
FEATURE_FILE_SUFFIXES = (".npy", ".npz", ".safetensors")


@dataclass
class ColumnMapping:
    """
    Which columns hold what. `None` for an id column means "the row position"; an optional column (`query_image`,
    `negative_ids`, `passage_image`) absent from the data is simply not used.

    Args:
        query_id: query id column (`None`: row position).
        question: question text column.
        query_image: query image column (optional).
        positive_ids: column of relevant KB ids (list per query).
        negative_ids: column of hard-negative KB ids (optional).
        passage_id: KB id column (`None`: row position). If the column is absent and `passage_id_fallback_to_row`,
            row positions are used (ViQuAE's `index` equals the row position).
        passage_text: passage text column.
        passage_title: optional title column, prepended to the text as "title. text".
        passage_image: passage image column (optional).
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
    (raw reference or None), `positive_rows`, `negative_rows` (KB row positions, int64). `kb` is the KB dataset
    (images not decoded); `passage_text(row)` / `passage_image(row)` read one passage.
    """

    queries: Any  # datasets.Dataset
    kb: Any  # datasets.Dataset
    mapping: ColumnMapping
    stats: DataStats
    kb_ids: list | None = None  # KB id of each row (None: the row position)

    @property
    def has_passage_images(self) -> bool:
        return self.mapping.passage_image is not None and self.mapping.passage_image in self.kb.column_names

    def passages(self, rows: Sequence[int]) -> tuple[list[str], list[Any]]:
        """Texts and raw image references of KB rows (one Arrow read)."""
        batch = self.kb[list(map(int, rows))]
        texts = [str(t) if t is not None else "" for t in batch[self.mapping.passage_text]]
        if self.mapping.passage_title is not None:
            texts = [f"{title}. {text}" if title else text for title, text in zip(batch[self.mapping.passage_title], texts)]
        images = batch[self.mapping.passage_image] if self.has_passage_images else [None] * len(texts)
        return texts, images


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
        loaded = datasets.load_from_disk(paths[0])
        return load_table(loaded, name)
    suffixes = {os.path.splitext(p)[1].lower() for p in paths}
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if len(suffixes) != 1 or next(iter(suffixes)) not in builders:
        raise ValueError(
            f"{name}: cannot read {paths}: give .jsonl/.json, .parquet or .csv files (one kind), a save_to_disk folder, "
            f"or a datasets.Dataset"
        )
    return datasets.load_dataset(builders[suffixes.pop()], data_files=paths, split="train")


def _lazy_images(dataset, column: str | None):
    """Keep `datasets.Image` cells undecoded ({'bytes', 'path'}) so that images load at collate time only."""
    import datasets

    if column is not None and column in dataset.column_names:
        feature = dataset.features[column]
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _require_columns(dataset, columns: dict[str, str | None], name: str) -> None:
    missing = {role: col for role, col in columns.items() if col is not None and col not in dataset.column_names}
    if missing:
        described = ", ".join(f"{role}={col!r}" for role, col in missing.items())
        raise ValueError(
            f"{name} lacks the column(s) {described}; it has {dataset.column_names}. Map your columns with "
            f"ColumnMapping(...) (CLI: --question_column etc.), or use ColumnMapping.viquae() for ViQuAE data"
        )


def _id_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, np.integer)):
        return [value]
    return list(value)


def _is_empty_text(text: Any) -> bool:
    return text is None or not str(text).strip()


def _empty_text_rows(dataset, column: str) -> list[int]:
    """Rows whose text is null or only whitespace, computed by Arrow over the (memory-mapped) column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = dataset.data.column(column)
    if dataset._indices is not None:  # a select()/shuffle() view: go through the index mapping
        values = pa.chunked_array([pa.array(dataset[column])])
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        values = pc.cast(values, pa.string())
    empty = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0))
    empty = pc.fill_null(empty, True)
    return np.flatnonzero(empty.to_numpy(zero_copy_only=False)).tolist()


def _few(items: Sequence, n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def build_kb_index(kb, mapping: ColumnMapping) -> tuple[list | None, dict | None]:
    """(KB id of each row or None, id -> row dict or None when ids are the row positions). Duplicate ids raise."""
    column = mapping.passage_id
    if column is not None and column not in kb.column_names:
        if mapping.passage_id_fallback_to_row:
            column = None
        else:
            _require_columns(kb, {"passage_id": column}, "the KB")
    if column is None:
        return None, None
    ids = kb[column]
    if all(isinstance(i, (int, np.integer)) for i in ids) and np.array_equal(np.asarray(ids), np.arange(len(ids))):
        return None, None  # ids are the row positions (ViQuAE's `index`): no dict needed
    keys = [str(i) for i in ids]
    index = {}
    duplicates = []
    for row, key in enumerate(keys):
        if key in index:
            duplicates.append(key)
        index[key] = row
    if duplicates:
        raise ValueError(
            f"the KB has duplicate ids in column {column!r}: {_few(sorted(set(duplicates)))}; every passage needs a "
            f"unique id (deduplicate the KB, or use passage_id=None to identify passages by row position)"
        )
    return ids, index


def prepare_training_data(
    queries: Any,
    kb: Any,
    mapping: ColumnMapping | None = None,
    on_missing_positive: str = "skip",
) -> PreparedData:
    """
    Read and validate queries + KB (see the module docstring for the format).

    Args:
        queries / kb: anything `load_table` accepts.
        mapping: column names (default: the generic format; `ColumnMapping.viquae()` for ViQuAE).
        on_missing_positive: `"skip"` drops queries without a positive (and logs how many), `"error"` raises.

    Raises:
        ValueError: missing columns, duplicate KB ids, ids absent from the KB (a few listed), empty questions or
            passage texts (without an image), queries without positives when `on_missing_positive="error"`.
    """
    import datasets

    mapping = mapping or ColumnMapping()
    if on_missing_positive not in MISSING_POSITIVE_ACTIONS:
        raise ValueError(f"on_missing_positive must be one of {MISSING_POSITIVE_ACTIONS}, got {on_missing_positive!r}")
    queries = _lazy_images(load_table(queries, "queries"), mapping.query_image)
    kb = _lazy_images(load_table(kb, "the KB"), mapping.passage_image)
    _require_columns(queries, {"question": mapping.question, "positive_ids": mapping.positive_ids,
                               "query_id": mapping.query_id}, "queries")
    _require_columns(kb, {"passage_text": mapping.passage_text, "passage_title": mapping.passage_title}, "the KB")
    if len(kb) == 0:
        raise ValueError("the KB is empty")

    kb_ids, kb_index = build_kb_index(kb, mapping)
    kb_has_image = mapping.passage_image is not None and mapping.passage_image in kb.column_names
    empty_rows = _empty_text_rows(kb, mapping.passage_text)  # Arrow compute: no Python copy of millions of texts
    kb_images = kb[mapping.passage_image] if kb_has_image else None
    empty = [
        (kb_ids[row] if kb_ids is not None else row)
        for row in empty_rows
        if kb_images is None or kb_images[row] is None
    ]
    if empty:
        raise ValueError(
            f"{len(empty)} KB passages have an empty text and no image (ids {_few(empty)}): drop them from the KB or "
            f"fill their text"
        )

    def to_row(value) -> int | None:
        if kb_index is None:
            try:
                row = int(value)
            except (TypeError, ValueError):
                return None
            return row if 0 <= row < len(kb) else None
        return kb_index.get(str(value))

    n = len(queries)
    ids = queries[mapping.query_id] if mapping.query_id is not None else list(range(n))
    questions = queries[mapping.question]
    has_image = mapping.query_image is not None and mapping.query_image in queries.column_names
    images = queries[mapping.query_image] if has_image else [None] * n
    has_negatives = mapping.negative_ids is not None and mapping.negative_ids in queries.column_names
    if mapping.negative_ids is not None and not has_negatives:
        logger.info(f"queries have no {mapping.negative_ids!r} column: negatives come from the batch and random passages")
    positives = queries[mapping.positive_ids]
    negatives = queries[mapping.negative_ids] if has_negatives else [None] * n

    stats = DataStats(n_queries_in=n, n_passages=len(kb))
    stats.n_passage_images = sum(image is not None for image in kb_images) if kb_images is not None else 0
    columns = {"query_id": [], "question": [], "image": [], "positive_rows": [], "negative_rows": [], "query_row": []}
    missing_ids, empty_questions, no_positive, duplicate_queries = [], [], [], []
    seen = set()
    for row in range(n):
        query_id = str(ids[row])
        if query_id in seen:
            duplicate_queries.append(query_id)
        seen.add(query_id)
        if _is_empty_text(questions[row]) and images[row] is None:
            empty_questions.append(query_id)
        pos_ids, neg_ids = _id_list(positives[row]), _id_list(negatives[row])
        pos_rows, neg_rows = [], []
        for value in pos_ids:
            r = to_row(value)
            (missing_ids.append((query_id, value)) if r is None else pos_rows.append(r))
        for value in neg_ids:
            r = to_row(value)
            (missing_ids.append((query_id, value)) if r is None else neg_rows.append(r))
        if not pos_rows:
            no_positive.append(query_id)
            continue
        pos_rows = list(dict.fromkeys(pos_rows))
        positive_set = set(pos_rows)
        neg_rows = [r for r in dict.fromkeys(neg_rows) if r not in positive_set]
        columns["query_id"].append(query_id)
        columns["question"].append("" if questions[row] is None else str(questions[row]))
        columns["image"].append(images[row])
        columns["positive_rows"].append(pos_rows)
        columns["negative_rows"].append(neg_rows)
        columns["query_row"].append(row)
        stats.positives_per_query.append(len(pos_rows))
        stats.negatives_per_query.append(len(neg_rows))
        stats.n_query_images += images[row] is not None

    if duplicate_queries:
        raise ValueError(f"queries have duplicate ids: {_few(sorted(set(duplicate_queries)))}; query ids must be unique")
    if empty_questions:
        raise ValueError(f"{len(empty_questions)} queries have an empty question and no image: {_few(empty_questions)}")
    if missing_ids:
        shown = ", ".join(f"{q!r}->{p!r}" for q, p in missing_ids[:5])
        raise ValueError(
            f"{len(missing_ids)} positive/negative passage ids of the queries are not in the KB (query->id: {shown}"
            f"{', ...' if len(missing_ids) > 5 else ''}); check that the KB is the one the ids refer to "
            f"(passage id column {mapping.passage_id!r})"
        )
    if no_positive:
        if on_missing_positive == "error":
            raise ValueError(
                f"{len(no_positive)} of {n} queries have no positive passage ({_few(no_positive)}): fix the data, or "
                f"pass on_missing_positive='skip' to train without them"
            )
        logger.warning(f"skipping {len(no_positive)} of {n} queries without a positive passage ({_few(no_positive)})")
    stats.n_skipped_no_positive = len(no_positive)
    stats.n_queries = len(columns["query_id"])
    if stats.n_queries == 0:
        raise ValueError(f"no query with a positive passage among {n}: nothing to train on")

    image_feature = None
    if has_image and isinstance(queries.features[mapping.query_image], datasets.Image):
        image_feature = queries.features[mapping.query_image]
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
    if image_feature is not None:
        prepared = prepared.add_column("image", image_column, feature=image_feature)
    elif any(image is not None for image in image_column):
        prepared = prepared.add_column("image", _plain_image_column(image_column))
    else:
        prepared = prepared.add_column("image", [None] * len(prepared), feature=datasets.Value("string"))
    logger.info(f"training data: {stats.summary()}")
    return PreparedData(queries=prepared, kb=kb, mapping=mapping, stats=stats, kb_ids=kb_ids)


def _plain_image_column(values: list) -> list:
    """Image references that Arrow can store: strings stay, arrays become nested lists, PIL images are encoded."""
    out = []
    for value in values:
        if value is None or isinstance(value, (str, dict)):
            out.append(value)
        elif isinstance(value, np.ndarray):
            out.append(value.tolist())
        else:
            out.append(value)
    return out


def load_feature_store(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """
    Precomputed visual features from a `.npz` or `.safetensors` file: key `NAME` -> features (V, feat_dim), optional
    key `NAME.visual_pos` -> normalised boxes (V, 4). Returns {NAME: {"visual_feats": ..., "visual_pos": ...}}.
    Query/KB `image` values then name a key of this store.
    """
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    elif path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        arrays = load_file(path)
    else:
        raise ValueError(f"feature store {path!r}: give a .npz or .safetensors file")
    store = {}
    for key, value in arrays.items():
        if key.endswith(".visual_pos"):
            continue
        store[key] = {"visual_feats": value, "visual_pos": arrays.get(f"{key}.visual_pos")}
    return store


def count_values(values: Sequence[int]) -> dict[int, int]:
    return dict(sorted(Counter(values).items()))


__all__ = [
    "ColumnMapping",
    "DataStats",
    "PreparedData",
    "load_table",
    "prepare_training_data",
    "load_feature_store",
    "build_kb_index",
]
