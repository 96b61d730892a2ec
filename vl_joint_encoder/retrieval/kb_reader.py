"""Columnar reads of a validated KB: contiguous row ranges as Python lists, one Arrow slice each.

A `datasets` column (`table["text"]`) is lazy in datasets 5.x: each row read (`column[r]`, or iterating it) rebuilds
a table over every record batch, so its cost grows with the KB (0.13 ms a read with 20 record batches, 21 ms with
12,000). Every pass `encode` makes over the KB (image check, fingerprint, length sort, batching) goes through
`KBReader.read(start, stop)` instead: one zero-copy Arrow slice of the needed columns, converted to Python for that
range only, so memory stays bounded by the range and the cost per passage does not depend on the KB size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.feature_stores import FeatureStore, feature_store_fingerprint
from ..data.references import is_image_cell, reference_key, resolved_path
from ..data.tables import KnowledgeBase, passage_texts


# rows converted to Python at once by the full passes (image check): bounded memory, large enough for Arrow
READ_ROWS = 65_536


@dataclass
class PassageRange:
    """KB rows `start`..`stop` (exclusive): their ids, texts (title prefixed) and image references (None: no image
    column)."""

    start: int
    stop: int
    ids: list[str]
    texts: list[str]
    images: list[Any] | None


class KBReader:
    """
    Reads a `KnowledgeBase` by contiguous row ranges (Arrow slices). Texts are composed by `tables.passage_texts`,
    the rule `KnowledgeBase.passages` uses too (tests check both give the same texts).
    """

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb
        mapping = kb.mapping
        self.text_column = mapping.passage_text
        self.title_column = mapping.passage_title
        self.image_column = kb.image_column
        # a KnowledgeBase subclass with its own passages (ViQuAE: article images joined, title modes) is read
        # through them, range by range
        self.custom = type(kb).passages is not KnowledgeBase.passages
        self.has_images = kb.count_images() > 0  # an image column of null cells only is no image column
        if not self.custom:
            self.arrow = kb.table.with_format("arrow")  # [start:stop] -> pyarrow.Table slice (zero copy)

    def __len__(self) -> int:
        return len(self.kb)

    def read(self, start: int, stop: int, with_texts: bool = True) -> PassageRange:
        stop = min(stop, len(self))
        if self.custom:
            texts, images = self.kb.passages(range(start, stop))
            return PassageRange(start, stop, self.kb.ids_in(start, stop), list(texts),
                                list(images) if self.has_images else None)  # fmt: skip
        table = self.arrow[start:stop]
        texts: list[str] = []
        if with_texts:
            titles = table.column(self.title_column).to_pylist() if self.title_column is not None else None
            texts = passage_texts(table.column(self.text_column).to_pylist(), titles)
        images = table.column(self.image_column).to_pylist() if self.has_images else None
        return PassageRange(start, stop, self.kb.ids_in(start, stop), texts, images)

    def ranges(self, size: int = READ_ROWS, with_texts: bool = True) -> Iterator[PassageRange]:
        for start in range(0, len(self), size):
            yield self.read(start, start + size, with_texts)


# ------------------------------------------------------------------------------------------------ fingerprints
FINGERPRINT_VERSION = 2


def _update_strings(digest, strings: Sequence[str]) -> None:
    """Lengths then bytes: one update per list, unambiguous (no separator can be faked)."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    digest.update(np.fromiter(map(len, encoded), dtype="<i8", count=len(encoded)).tobytes())
    digest.update(b"".join(encoded))


def file_signature(path: str) -> str:
    """`size:mtime_ns` of a file ("" if absent: a store key is not a file): what the KB fingerprint records of an
    image file (a stat, not a read of its contents)."""
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def image_file_path(value: Any, store: FeatureStore | None, image_root: str | None) -> str | None:
    """The file an image reference points to (image or feature file), or None (store key, bytes, arrays, none)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if is_image_cell(value):
        return None if value.get("bytes") or not value.get("path") else resolved_path(value["path"], image_root)
    if isinstance(value, str):
        return None if store is not None and value in store else resolved_path(value, image_root)
    return None


def rows_fingerprint(rows: PassageRange, store: FeatureStore | None, image_root: str | None) -> str:
    """
    sha256 of KB rows: their count and start, ids, texts, image references and, for references to files, each
    file's size and modification time (a changed image at the same path changes the fingerprint; a stat per distinct
    file, about 2 us, instead of reading its bytes, about 1 ms per 100 kB image: see benchmarks/RESULTS.md). Feature
    store arrays are fingerprinted apart (`features_fingerprint`).
    """
    digest = hashlib.sha256(f"kb-rows-v{FINGERPRINT_VERSION};{rows.start};{rows.stop};".encode())
    _update_strings(digest, rows.ids)
    _update_strings(digest, rows.texts)
    if rows.images is not None:
        _update_strings(digest, [reference_key(image) for image in rows.images])
        signatures, seen = [], {}  # one stat per distinct file of the range (an article's passages share its image)
        for image in rows.images:
            path = image_file_path(image, store, image_root)
            if path is not None and path not in seen:
                seen[path] = file_signature(path)
            signatures.append("" if path is None else seen[path])
        _update_strings(digest, signatures)
    return digest.hexdigest()


def features_fingerprint(rows: PassageRange, store: FeatureStore | None) -> str | None:
    """sha256 of the feature-store arrays the rows reference (None when they reference no store key)."""
    if store is None or rows.images is None:
        return None
    keys = sorted({image for image in rows.images if isinstance(image, str) and image in store})
    return feature_store_fingerprint(store, keys) if keys else None


def combine_fingerprints(count: int, parts: Sequence[str | None]) -> str | None:
    """One fingerprint of a whole KB from its shards' (in shard order); None when every part is None."""
    if all(part is None for part in parts):
        return None
    digest = hashlib.sha256(f"kb-v{FINGERPRINT_VERSION};{count};{len(parts)};".encode())
    _update_strings(digest, [part or "" for part in parts])
    return digest.hexdigest()


__all__ = [
    "FINGERPRINT_VERSION",
    "KBReader",
    "PassageRange",
    "combine_fingerprints",
    "features_fingerprint",
    "file_signature",
    "image_file_path",
    "rows_fingerprint",
]
