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

Columns are named by a `ColumnMapping`; `None` for an id column means "the row position". An optional column left
at its default name (`image`, `negative_ids`) may be absent; one named explicitly (`--image_column img`, a
`with_overrides(...)` value) must exist, so that a typo is an error naming the column and the ones the table has, not
a silent text-only run.

Every reader goes through the checks here, whose errors name the file, the line or row, the column and the fix:
unreadable / empty / malformed files (`path:line: ...` for JSON lines), null or duplicate ids (queries and KB alike;
a null id never becomes "None"), missing columns, empty texts without an image, ids absent from the KB.
`training_data_problems` collects every refusal of `prepare_training_data` instead of stopping at the first one: it
is what `data-report` reports.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from transformers.utils import logging


logger = logging.get_logger(__name__)

MISSING_POSITIVE_ACTIONS = ("skip", "error")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# roles whose column may be absent from the data (then not used), when left at the mapping's default name
OPTIONAL_ROLES = ("query_image", "negative_ids", "passage_title", "passage_image")


class DataError(ValueError):
    """Bad queries / KB: `problems` lists every problem found (the message joins them), each naming the column, a
    few rows or ids, and the fix."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(self.problems[0] if len(self.problems) == 1 else "\n".join(
            [f"{len(self.problems)} problems:"] + [f"- {problem}" for problem in self.problems]
        ))  # fmt: skip


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
        absent_ok: the optional roles whose column may be absent (default: those left at their default name);
            `with_overrides` removes the roles it sets, so that an explicitly named column must exist.
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
    absent_ok: frozenset[str] | None = None

    def __post_init__(self):
        if self.absent_ok is None:
            defaults = {f.name: f.default for f in fields(ColumnMapping)}
            self.absent_ok = frozenset(role for role in OPTIONAL_ROLES if getattr(self, role) == defaults[role])
        self.absent_ok = frozenset(self.absent_ok)

    def optional_column(self, table, role: str, name: str) -> str | None:
        """The column of optional `role` if `table` has it; None if it is absent and may be (`absent_ok`), else a
        ValueError naming the column and the columns the table has."""
        column = getattr(self, role)
        if column is None or column in table.column_names:
            return column
        if role in self.absent_ok:
            return None
        raise ValueError(
            f"{name} has no column {column!r} (the {role.replace('_', ' ')} column you named); it has "
            f"{table.column_names}: fix the column name, or leave the option out to use none"
        )

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
            absent_ok=frozenset(OPTIONAL_ROLES),
        )

    def with_overrides(self, **overrides: str | None) -> ColumnMapping:
        """A copy with the given fields replaced (`None` values are ignored: "keep the preset's column"). An optional
        column set here must exist in the data."""
        known = {f.name for f in fields(self)} - {"absent_ok"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown column role(s) {unknown}; roles are {sorted(known)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(given)
        values["absent_ok"] = self.absent_ok - set(given)
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
    kind = TABLE_SUFFIXES[suffixes.pop()]
    empty = [path for path in paths if os.path.getsize(path) == 0]
    if empty:
        raise ValueError(f"{name}: {empty[0]!r} is empty (0 bytes): nothing to read (check the file you passed)")
    try:
        table = datasets.load_dataset(kind, data_files=paths, split="train")
    except Exception as error:  # datasets wraps the reader's error: find the file and line ourselves
        problem = next((p for p in map(json_lines_problem, paths) if p), None) if kind == "json" else None
        if problem is None:
            cause = _root_cause(error)
            problem = f"cannot read {paths if len(paths) > 1 else paths[0]!r} as {kind} ({type(cause).__name__}: {cause})"
        raise ValueError(f"{name}: {problem}") from None
    # the first load converts the files to datasets' memory-mapped Arrow cache; its reader's buffers (3 GB at 12M
    # Parquet rows) stay with Arrow's allocator unless handed back
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    return table


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}[type(value)]


def json_lines_problem(path: str) -> str | None:
    """What makes `path` unreadable as JSON lines (or as a JSON list of objects), as `path:line: what (fix)`, or
    None when every line is a JSON object whose columns keep one type. Read only when loading failed."""
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            head = handle.read(4096).lstrip()
            if not head:
                return f"{path!r} holds only whitespace: write one JSON object per line"
            handle.seek(0)
            if head.startswith("["):
                try:
                    rows = json.load(handle)
                except json.JSONDecodeError as error:
                    return f"{path}:{error.lineno}:{error.colno}: invalid JSON ({error.msg})"
                lines = [(row, f"{path}: element {i}") for i, row in enumerate(rows)] if isinstance(rows, list) else []
            else:
                lines = []
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        lines.append((json.loads(line), f"{path}:{number}"))
                    except json.JSONDecodeError as error:
                        if number == 1 and head.startswith("{"):
                            handle.seek(0)
                            try:
                                whole = json.load(handle)
                            except json.JSONDecodeError:
                                whole = None
                            if isinstance(whole, dict):
                                return (
                                    f"{path!r} holds one JSON object over several lines: write one object per line "
                                    f"(JSON lines), or a JSON list of objects"
                                )
                        return f"{path}:{number}:{error.colno}: invalid JSON ({error.msg}): one JSON object per line"
    except UnicodeDecodeError as error:
        return f"{path!r} is not UTF-8 text ({error.reason} at byte {error.start}): is it a JSON lines file?"
    kinds: dict[str, tuple[str, str]] = {}
    for row, where in lines:
        if not isinstance(row, dict):
            return f"{where}: a JSON {_json_kind(row)} where a JSON object {{\"column\": value, ...}} is expected"
        for column, value in row.items():
            if value is None:
                continue
            kind = _json_kind(value)
            first = kinds.setdefault(column, (kind, where))
            if first[0] != kind:
                return (
                    f"{where}: column {column!r} holds a {kind} here but a {first[0]} at {first[1]}: give every row "
                    f"the same type in a column (e.g. all ids as strings)"
                )
    return None


def check_column_types(table, columns: Sequence[str | None], name: str, source: Any = None) -> None:
    """Refuse a used column whose rows mix JSON types (datasets reads it as a `Json` feature: a text column holding
    a list would become the text "['x']"); the message names the line when `source` is a JSON lines file."""
    import datasets

    json_type = getattr(datasets, "Json", None)
    mixed = [c for c in columns if c is not None and c in table.column_names
             and json_type is not None and isinstance(table.features[c], json_type)]  # fmt: skip
    if not mixed:
        return
    where = ""
    paths = [source] if isinstance(source, (str, os.PathLike)) else source if isinstance(source, list) else []
    for path in paths:
        if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
            where = json_lines_problem(os.fspath(path)) or ""
            if where:
                break
    raise ValueError(
        f"{name}: column(s) {mixed} mix value types between rows (e.g. strings and lists)"
        + (f": {where}" if where else ": give every row the same type in a column")
    )


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


def column_values(table, column: str) -> list:
    """Every value of `column` as a Python list, in one read. In datasets 5 `table[column]` is a lazy `Column`:
    each item read rebuilds a table over every record batch (18 us to 21 ms a row, by the file's layout), so a row by
    row pass over the 11.9M-passage ViQuAE KB would take hours; Arrow reads it at once (0.1 us a row). Image cells
    come back as stored ({"bytes", "path"}), as `undecoded_images` leaves them."""
    return arrow_column(table, column).to_pylist()


def iter_values(table, column: str, rows: int = 65_536) -> Iterator[Any]:
    """The values of `column`, streamed: converted to Python `rows` at a time (one Arrow slice each), so a pass over
    a large KB holds one slice of Python objects at once."""
    values = arrow_column(table, column)
    for start in range(0, len(values), rows):
        yield from values.slice(start, rows).to_pylist()


def passage_texts(texts: Sequence[Any], titles: Sequence[Any] | None = None) -> list[str]:
    """The text a passage is encoded with: `str(text)` ("" for null: an image-only passage), `"{title}. {text}"`
    when there is a title column and this passage's title is non-empty. The one rule for every KB reader."""
    texts = ["" if text is None else str(text) for text in texts]
    if titles is None:
        return texts
    return [f"{head}. {text}" if head else text for head, text in zip(titles, texts)]


def id_list(value: Any) -> list:
    """A cell of an id-list column as a list (a scalar id becomes a one-element list, None an empty one)."""
    if value is None:
        return []
    if isinstance(value, (str, int, np.integer)):
        return [value]
    return list(value)


def arrow_column(dataset, column: str):
    """`column` of a `datasets.Dataset` as a `pyarrow.ChunkedArray`, without a Python object per row: zero copy from
    the (memory-mapped) table, or one Arrow `take` for a select()ed / shuffled view."""
    if dataset._indices is not None:
        return dataset.with_format("arrow")[column]
    return dataset.data.column(column)


def check_ids(values, column: str, name: str, what: str, fix: str):
    """
    (`values` as an Arrow string column, problems): the one id check of queries and KB passages, columnar (Arrow
    compute over a `pyarrow` array: no Python object per row, 0.3 us a row for the duplicate count at 12M rows).
    Refused: null ids (a null id must never become the string "None"), empty ones, ids that are neither strings nor
    integers (a float column, e.g. a CSV id column with empty cells), and duplicates (they would silently merge two
    rows downstream).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, pa.Array):
        values = pa.chunked_array([values])
    if pa.types.is_dictionary(values.type):
        values = pc.cast(values, values.type.value_type)
    problems, kind = [], values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        strings = values
    elif pa.types.is_integer(kind) or pa.types.is_null(kind):
        strings = pc.cast(values, pa.string())
    else:
        row = int(pc.index(pc.is_valid(values), True).as_py())
        value = values[row].as_py()
        problems.append(
            f"{name}: {len(values) - values.null_count} id(s) in column {column!r} are neither strings nor integers "
            f"(row {row}: {value!r} of type {type(value).__name__}): give ids as strings or integers (a CSV column "
            f"with empty cells is read as floats)"
        )
        try:
            strings = pc.cast(values, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            strings = pa.chunked_array([pa.nulls(len(values), pa.string())])
    blank = pc.fill_null(pc.or_(pc.equal(pc.binary_length(strings), 0), pc.utf8_is_space(strings)), True)
    nulls = np.flatnonzero(blank.to_numpy(zero_copy_only=False))
    if len(nulls):
        problems.append(
            f"{name}: {len(nulls)} null or empty id(s) in column {column!r} (rows {few(nulls.tolist())}): every row "
            f"needs an id"
        )
    counts = pc.value_counts(strings)  # a transient Arrow hash table (~40 bytes an id), released right after
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1)).drop_null()
    del counts
    pa.default_memory_pool().release_unused()  # give the hash table's pages back (the allocator would keep them)
    if len(repeated):
        duplicates = sorted(repeated.to_pylist())
        problems.append(
            f"{name}: {len(duplicates)} duplicate {what} ids, e.g. {few(duplicates)} (column {column!r}): {fix}"
        )
    return strings, problems


def is_row_positions(values) -> bool:
    """True when an Arrow id column holds the integers 0..n-1 in order (ids are then the row positions), checked
    record batch by record batch (zero-copy numpy views)."""
    import pyarrow as pa

    if not pa.types.is_integer(values.type) or values.null_count:
        return False
    start = 0
    for chunk in values.chunks:
        if not np.array_equal(chunk.to_numpy(), np.arange(start, start + len(chunk))):
            return False
        start += len(chunk)
    return True


def empty_text_rows(dataset, column: str) -> np.ndarray:
    """Rows whose text is null, empty or only whitespace, computed by Arrow over the (memory-mapped) column without
    copying it (a length and a whitespace test per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = arrow_column(dataset, column)
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        values = pc.cast(values, pa.string())
    empty = pc.or_kleene(pc.is_null(values), pc.or_(pc.equal(pc.binary_length(values), 0), pc.utf8_is_space(values)))
    return np.flatnonzero(pc.fill_null(empty, True).to_numpy(zero_copy_only=False))


# ------------------------------------------------------------------------------------------------ the KB
class KnowledgeBase:
    """
    A validated KB: `len(kb)` passages, `ids` (the KB id of each row as an Arrow string column, or None when ids are
    the row positions), and `passages(rows)` -> (texts, image references) in one Arrow read. Built by
    `read_knowledge_base`.

    Nothing here holds a Python object per passage: ids stay in Arrow (zero copy from the memory-mapped table), and
    looking ids up (`rows_of`) is one Arrow hash join per call, so call it once with every id to look up (2.6 s
    against 12M ids here), not once per id.
    """

    def __init__(self, table, mapping: ColumnMapping, ids=None):
        self.table = table
        self.mapping = mapping
        self.ids = ids

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
        """The id of every passage, in row order (`str(row)` when ids are the row positions): one Python string per
        passage, for small KBs; large ones are read by range (`ids_in`)."""
        return self.ids_in(0, len(self))

    def ids_in(self, start: int, stop: int) -> list[str]:
        """The ids of rows `start`..`stop` (exclusive), one Arrow slice."""
        stop = min(stop, len(self))
        if self.ids is None:
            return [str(row) for row in range(start, stop)]
        return self.ids.slice(start, max(stop - start, 0)).to_pylist()

    def ids_of(self, rows: Sequence[int]) -> list[str]:
        """The ids of KB rows (one Arrow take)."""
        if self.ids is None:
            return [str(int(row)) for row in rows]
        import pyarrow as pa

        return self.ids.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def id_of(self, row: int) -> str:
        return self.ids[int(row)].as_py() if self.ids is not None else str(int(row))

    def rows_of(self, values: Sequence[Any]) -> np.ndarray:
        """
        The KB row of each id in `values` (int64; -1 for an id not in the KB; a null id is in no KB). Ids compare as
        strings (`5` finds the passage whose id is "5"); a KB identified by row positions takes the integers
        0..len-1 or their decimal strings, nothing else (a float 1.9 is no row, not row 1).
        """
        values = list(values)
        rows = np.full(len(values), -1, dtype=np.int64)
        if self.ids is None:
            for i, value in enumerate(values):
                if isinstance(value, str) and value.strip().isdigit():
                    row = int(value)
                elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                    row = int(value)
                else:
                    continue
                rows[i] = row if 0 <= row < len(self) else -1
            return rows
        if not values:
            return rows
        import pyarrow as pa
        import pyarrow.compute as pc

        needles = pa.array([None if value is None else str(value) for value in values], type=pa.string())
        found = pc.index_in(needles, value_set=self.ids)
        return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    def passages(self, rows: Sequence[int]) -> tuple[list[str], list[Any]]:
        """Texts (title prefixed when a title column is mapped) and raw image references of KB rows."""
        batch = self.table[list(map(int, rows))]
        title = self.mapping.passage_title
        texts = passage_texts(batch[self.mapping.passage_text], batch[title] if title is not None else None)
        images = batch[self.image_column] if self.has_images else [None] * len(texts)
        return texts, images

    def count_images(self) -> int:
        """How many passages have an image reference (an Arrow null count, no read of the cells)."""
        if not self.has_images:
            return 0
        column = arrow_column(self.table, self.image_column)
        return len(column) - column.null_count

    def images(self) -> list[Any] | None:
        """Every passage's image reference (one Python object per passage: for small KBs; `retrieval.kb_reader` reads
        large ones by range), or None when the KB has no image column (or only null cells)."""
        if self.count_images() == 0:
            return None
        return column_values(self.table, self.image_column)


def read_knowledge_base(
    source: Any,
    mapping: ColumnMapping | None = None,
    name: str = "the KB",
    check_texts: bool = True,
    progress: bool = False,
) -> KnowledgeBase:
    """
    Read and validate a KB (anything `load_table` accepts, or a `KnowledgeBase`, returned as is). Every check is
    columnar (Arrow compute, 0.4 us a passage with string ids, 12M passages in 5 s); `progress` shows them as a bar.

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
    mapping.optional_column(table, "passage_image", name)
    check_column_types(table, [mapping.passage_id, mapping.passage_text, mapping.passage_title], name, source)
    from tqdm.auto import tqdm

    bar = tqdm(total=2, desc=f"check {name} ({len(table):,} passages: ids, texts)", unit="check", disable=not progress)
    ids, problems = None, []
    column = mapping.passage_id
    if column is not None and column not in table.column_names:
        if not mapping.passage_id_fallback_to_row:
            require_columns(table, {"passage_id": column}, name)
        column = None
    if column is not None:
        values = arrow_column(table, column)
        if not is_row_positions(values):  # integer ids equal to the row positions need no column
            ids, problems = check_ids(
                values, column, name, "passage", "every passage needs a unique id (deduplicate the KB, or map "
                "passage_id=None to identify passages by row position)"
            )  # fmt: skip
    kb = KnowledgeBase(table, mapping, ids)
    bar.update(1)
    empty_rows = empty_text_rows(table, mapping.passage_text) if check_texts else ()
    if len(empty_rows):
        if kb.count_images():  # an image-only passage may have an empty text
            import pyarrow as pa

            images = arrow_column(table, kb.image_column).take(pa.array(empty_rows))
            empty_rows = empty_rows[images.is_null().to_numpy(zero_copy_only=False)]
        if len(empty_rows):
            problems.append(
                f"{len(empty_rows)} passages of {name} have an empty text and no image (ids "
                f"{few(kb.ids_of(empty_rows[:5]))}{'' if len(empty_rows) <= 5 else ', ...'}): drop them or fill their "
                f"text (column {mapping.passage_text!r})"
            )
    bar.update(1)
    bar.close()
    if problems:
        raise DataError(problems)
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
    source: Any,
    mapping: ColumnMapping | None = None,
    need_positives: bool = False,
    name: str = "the queries",
    need_negatives: bool = False,
) -> Queries:
    """
    Read and validate queries (anything `load_table` accepts, or `Queries`, returned as is). An explicitly named
    negatives column must exist only with `need_negatives` (training: evaluation queries need no negatives).

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
    check_column_types(table, [mapping.query_id, mapping.question, mapping.positive_ids, mapping.negative_ids], name,
                       source)  # fmt: skip
    n, problems = len(table), []
    if mapping.query_id is not None:
        ids, problems = check_ids(
            arrow_column(table, mapping.query_id), mapping.query_id, name, "query", "query ids must be unique"
        )
        ids = ids.to_pylist()
    else:
        ids = [str(row) for row in range(n)]
    questions = ["" if q is None else str(q) for q in column_values(table, mapping.question)]
    image_column = mapping.optional_column(table, "query_image", name)
    images = column_values(table, image_column) if image_column is not None else None
    empty = [ids[r] for r, q in enumerate(questions) if not q.strip() and (images is None or images[r] is None)]
    if empty:
        problems.append(
            f"{len(empty)} of {name} have an empty question and no image (ids {few(empty)}): drop them or fill "
            f"column {mapping.question!r}"
        )
    has_positives = mapping.positive_ids in table.column_names
    if need_negatives:
        has_negatives = mapping.optional_column(table, "negative_ids", name) is not None
    else:
        has_negatives = mapping.negative_ids is not None and mapping.negative_ids in table.column_names
    if problems:
        raise DataError(problems)
    return Queries(
        ids=ids,
        questions=questions,
        images=images,
        positive_ids=[id_list(v) for v in column_values(table, mapping.positive_ids)] if has_positives else None,
        negative_ids=[id_list(v) for v in column_values(table, mapping.negative_ids)] if has_negatives else None,
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
    found = kb.rows_of([value for positives in queries.positive_ids for value in positives])  # one lookup
    names = iter(kb.ids_of(found[found >= 0]))
    rows = iter(found.tolist())
    for query_id, positives in zip(queries.ids, queries.positive_ids):
        qrels[query_id] = {}
        for value in positives:
            if next(rows) < 0:
                missing.append((query_id, value))
            else:
                qrels[query_id][next(names)] = 1
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
    problems = []  # both sides are read and checked before refusing, so that one run lists every problem
    try:
        queries = read_queries(queries, mapping, need_positives=True, need_negatives=True)
    except DataError as error:
        problems += error.problems
    try:
        kb = read_knowledge_base(kb, mapping)
    except DataError as error:
        problems += error.problems
    if problems:
        raise DataError(problems)
    if queries.negative_ids is None and mapping.negative_ids is not None:
        logger.info(f"queries have no {mapping.negative_ids!r} column: negatives come from the batch and random passages")
    n = len(queries)
    images = queries.images if queries.images is not None else [None] * n
    negatives = queries.negative_ids if queries.negative_ids is not None else [[] for _ in range(n)]
    stats = DataStats(n_queries_in=n, n_passages=len(kb))
    stats.n_passage_images = kb.count_images()
    # every positive and negative id looked up at once (one Arrow hash join), then consumed in query order
    found = iter(kb.rows_of([v for row in range(n) for values in (queries.positive_ids[row], negatives[row])
                             for v in values]).tolist())  # fmt: skip
    columns = {"query_id": [], "question": [], "image": [], "positive_rows": [], "negative_rows": [], "query_row": []}
    missing_ids, no_positive = [], []
    for row in range(n):
        query_id = queries.ids[row]
        pos_rows, neg_rows = [], []
        for values, rows in ((queries.positive_ids[row], pos_rows), (negatives[row], neg_rows)):
            for value in values:
                r = next(found)
                (missing_ids.append((query_id, value)) if r < 0 else rows.append(r))
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

    problems = [_missing_ids_message(missing_ids, mapping)] if missing_ids else []
    if no_positive and on_missing_positive == "error":
        problems.append(
            f"{len(no_positive)} of {n} queries have no positive passage ({few(no_positive)}): fix the data, or "
            f"pass on_missing_positive='skip' (--on_missing_positive skip) to train without them"
        )
    if not columns["query_id"] and not missing_ids:
        problems.append(f"no query with a positive passage among {n}: nothing to train on")
    if problems:
        raise DataError(problems)
    if no_positive:
        logger.warning(f"skipping {len(no_positive)} of {n} queries without a positive passage ({few(no_positive)})")
    stats.n_skipped_no_positive = len(no_positive)
    stats.n_queries = len(columns["query_id"])

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


def training_data_problems(
    queries: Any, kb: Any, mapping: ColumnMapping | None = None, on_missing_positive: str = "skip"
) -> list[str]:
    """
    Everything `prepare_training_data` (hence `train`) would refuse in these queries and KB, as messages, instead of
    stopping at the first: the same readers and checks, run on each side even when the other one fails. An empty
    list: `train` accepts the data (image references are checked by `data.references` at batch time).
    """
    mapping = mapping or ColumnMapping()
    problems, read = [], {}
    for side, reader in (
        ("queries", lambda: read_queries(queries, mapping, need_positives=True, need_negatives=True)),
        ("kb", lambda: read_knowledge_base(kb, mapping)),
    ):
        try:
            read[side] = reader()
        except DataError as error:
            problems += error.problems
        except ValueError as error:
            problems.append(str(error))
    if len(read) == 2:
        try:
            prepare_training_data(read["queries"], read["kb"], mapping, on_missing_positive)
        except DataError as error:
            problems += error.problems
        except ValueError as error:
            problems.append(str(error))
    return problems


def _storable_references(values: list) -> list:
    """Image references that Arrow can store: strings and cells stay, arrays become nested lists."""
    return [value.tolist() if isinstance(value, np.ndarray) else value for value in values]


__all__ = [
    "OPTIONAL_ROLES",
    "ColumnMapping",
    "DataError",
    "DataStats",
    "KnowledgeBase",
    "PreparedData",
    "Queries",
    "arrow_column",
    "check_ids",
    "column_values",
    "iter_values",
    "passage_texts",
    "json_lines_problem",
    "load_table",
    "prepare_training_data",
    "qrels_from_queries",
    "read_knowledge_base",
    "read_queries",
    "training_data_problems",
]
