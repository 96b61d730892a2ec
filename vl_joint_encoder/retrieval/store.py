"""On-disk format of an encoded knowledge base: safetensors shards + ids + manifest, written atomically, checked on load.

    output_dir/
      plan.json                  what is being encoded (model hash, count, shard layout): resume checks it
      shards/shard-00000.safetensors   "embeddings" (n, D) + "positions" (n,) int64 KB rows; metadata: shard index,
                                       plan hash, model hash, sha256 of the embeddings and of the positions,
                                       fingerprint of the KB rows it encodes and of their feature-store arrays
      ids.json                   passage ids in KB row order (position -> id)
      manifest.json              written last: model (name, revision, weights sha256), similarity, normalized, dim,
                                 dtype, count, KB fingerprint, each shard's size and checksums (tensors and file),
                                 ids.json's size and checksum, and its own checksum (`manifest_sha256`)

A directory without manifest.json is an unfinished encoding (resume it with the same command). Opening a store checks
the manifest's checksum and every file's size (cheap); `verify=True` (`search --verify`) also checks, as shards are
read, the sha256 of their tensors and metadata and of ids.json: a flipped bit in a shard's data or metadata is found.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from ..utils.io import atomic_path, atomic_write, read_json


logger = logging.get_logger(__name__)

FORMAT = "vl-joint-encoder-embeddings"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PLAN = "plan.json"
IDS = "ids.json"
SHARD_DIR = "shards"


def write_ids(path: str | os.PathLike, chunks: Iterable[list[str]]) -> None:
    """Write the passage ids file atomically from `chunks` of ids (row order), one chunk in memory at a time. The
    bytes are those of `json.dump(ids, indent=1)` plus a newline (tests compare them)."""
    with atomic_write(path) as handle:
        first = True
        for chunk in chunks:
            if not chunk:
                continue
            handle.write(("[\n " if first else ",\n ") + ",\n ".join(json.dumps(i) for i in chunk))
            first = False
        handle.write("[]\n" if first else "\n]\n")


def shard_name(index: int) -> str:
    return os.path.join(SHARD_DIR, f"shard-{index:05d}.safetensors")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (contiguous CPU copy)."""
    data = tensor.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().data if data.numel() else b"").hexdigest()  # no copy


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_checksum(manifest: dict) -> str:
    """sha256 of a manifest's canonical JSON without its `manifest_sha256` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def metadata_checksum(metadata: dict) -> str:
    """sha256 of a shard's metadata (canonical JSON): with the tensors' checksums, what identifies a shard's content."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# what an encoding folder may hold besides hidden temporaries (`utils.io.atomic_path`)
OWN_ENTRIES = {PLAN, MANIFEST, IDS, SHARD_DIR}


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """
    Refuse to write an encoding into a folder another tool wrote (an extract-features folder, a training output, any
    non-empty folder without this format's plan.json): its files would be overwritten or mixed with shards.
    """
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output folder {output_dir!r} is a file: give a new or empty folder")
    if not os.path.isdir(output_dir):
        return
    entries = sorted(e for e in os.listdir(output_dir) if not e.startswith("."))
    if not entries:
        return
    plan_path = os.path.join(output_dir, PLAN)
    plan = None
    if os.path.isfile(plan_path):
        try:
            plan = read_json(plan_path, "encoding plan")
        except ValueError:
            plan = None
    foreign = [e for e in entries if e not in OWN_ENTRIES]
    if not isinstance(plan, dict) or plan.get("format") != FORMAT or foreign:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise ValueError(
            f"{output_dir!r} is not empty and was not written by `vl-joint-encoder encode` (it holds {shown}): "
            f"nothing was written into it. Give a new or empty --output_dir"
        )


def write_shard(
    output_dir: str | os.PathLike,
    index: int,
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    plan_hash: str,
    model_hash: str,
    extra: dict[str, str] | None = None,
) -> dict:
    """Write shard `index` atomically (temp file, then os.replace): a crash never leaves a complete-looking shard.
    `extra`: more string metadata (the encoder's fingerprints of the rows)."""
    path = os.path.join(output_dir, shard_name(index))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    embeddings, positions = embeddings.contiguous().cpu(), positions.to(torch.int64).contiguous().cpu()
    metadata = {
        "format": FORMAT,
        "shard": str(index),
        "rows": str(embeddings.shape[0]),
        "plan_hash": plan_hash,
        "model_hash": model_hash,
        "sha256": tensor_sha256(embeddings),
        "positions_sha256": tensor_sha256(positions),
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        save_file({"embeddings": embeddings, "positions": positions}, tmp, metadata=metadata)
    return metadata


def read_shard_metadata(path: str | os.PathLike) -> dict | None:
    """The shard's metadata, or None if the file is missing or unreadable (truncated, not safetensors)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file is "not a complete shard"
        return None


def load_shard(path: str | os.PathLike, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(embeddings (n, D), positions (n,), metadata); with `verify` the embeddings' sha256 is checked."""
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        embeddings, positions = f.get_tensor("embeddings"), f.get_tensor("positions")
    if verify and (
        tensor_sha256(embeddings) != metadata.get("sha256")
        or ("positions_sha256" in metadata and tensor_sha256(positions) != metadata["positions_sha256"])
    ):
        raise ValueError(f"shard {os.fspath(path)!r} is corrupted (checksum mismatch): delete it and re-run encode")
    return embeddings, positions, metadata


class EmbeddingStore:
    """
    A finished encoding directory: `manifest`, `ids` (position -> passage id), `similarity`, `model_hash`, and
    `chunks(rows)` yielding (embeddings, positions) from the shards. Opening checks the manifest (its own checksum)
    against the files (sizes, count, model, no stray shards from another model); `verify=True` also checks ids.json's
    sha256 and, as shards are read, the checksums of their tensors and metadata.
    """

    def __init__(self, directory: str | os.PathLike, verify: bool = False):
        self.directory = os.fspath(directory)
        manifest_path = os.path.join(self.directory, MANIFEST)
        if not os.path.isfile(manifest_path):
            hint = (
                " (encoding unfinished: re-run the same encode command to resume)"
                if os.path.isfile(os.path.join(self.directory, PLAN))
                else ""
            )
            raise ValueError(f"{self.directory!r} has no {MANIFEST}: not an encoded knowledge base{hint}")
        self.manifest = read_json(manifest_path, "embeddings manifest")
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a {FORMAT} manifest")
        if "manifest_sha256" in self.manifest:
            if manifest_checksum(self.manifest) != self.manifest["manifest_sha256"]:
                raise ValueError(
                    f"{manifest_path} was modified or corrupted after encoding (its checksum does not match): re-run "
                    f"the encode command into a new folder"
                )
        else:
            logger.warning(f"{manifest_path} was written by an earlier version (no checksums of its files)")
        self.verify = verify
        self._check_shards()
        self._ids: list[str] | None = None

    @property
    def similarity(self) -> str:
        return self.manifest["similarity"]

    @property
    def model_hash(self) -> str:
        return self.manifest["model"]["sha256"]

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def normalized(self) -> bool:
        return bool(self.manifest["normalized"])

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = read_json(os.path.join(self.directory, IDS), "passage ids file")
            if len(self._ids) != self.count:
                raise ValueError(f"{IDS} has {len(self._ids)} ids but the manifest counts {self.count} passages")
        return self._ids

    def _check_shards(self) -> None:
        listed = {entry["file"] for entry in self.manifest["shards"]}
        shard_dir = os.path.join(self.directory, SHARD_DIR)
        present = {os.path.join(SHARD_DIR, name) for name in os.listdir(shard_dir) if name.endswith(".safetensors")}
        foreign = []
        for name in sorted(present | listed):
            metadata = read_shard_metadata(os.path.join(self.directory, name))
            if name in listed and metadata is None:
                raise ValueError(f"shard {name} listed in the manifest is missing or unreadable: re-run encode")
            if metadata is not None and metadata.get("model_hash") != self.model_hash:
                foreign.append(name)
        if foreign:
            raise ValueError(
                f"{self.directory!r} mixes shards from different models: {foreign[:5]} were not encoded with model "
                f"{self.model_hash[:12]} of the manifest; encode each model into its own directory"
            )
        for entry in [self.manifest.get("ids"), *self.manifest["shards"]]:
            if entry is None or "bytes" not in entry:
                continue
            path = os.path.join(self.directory, entry["file"])
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != entry["bytes"]:
                raise ValueError(
                    f"{path} has {size} bytes but the manifest records {entry['bytes']}: it was changed or truncated "
                    f"after encoding; re-run encode into a new folder"
                )
            if self.verify and entry is self.manifest.get("ids") and file_sha256(path) != entry["sha256"]:
                raise ValueError(
                    f"{path} is corrupted (its sha256 differs from the manifest's): re-run encode into a new folder"
                )
        rows = sum(int(entry["rows"]) for entry in self.manifest["shards"])
        if rows != self.count:
            raise ValueError(f"shards hold {rows} rows but the manifest counts {self.count}: re-run encode")

    def chunks(self, max_rows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(embeddings (n, D), positions (n,)) per shard, split into pieces of at most `max_rows` rows."""
        for entry in self.manifest["shards"]:
            embeddings, positions, metadata = load_shard(os.path.join(self.directory, entry["file"]), self.verify)
            if (
                metadata.get("sha256") != entry["sha256"]
                or embeddings.shape[0] != int(entry["rows"])
                or (
                    self.verify
                    and "metadata_sha256" in entry
                    and metadata_checksum(metadata) != entry["metadata_sha256"]
                )
            ):
                raise ValueError(
                    f"shard {entry['file']} does not match the manifest (re-encoded since?): re-run encode"
                )
            step = max_rows or embeddings.shape[0]
            for start in range(0, embeddings.shape[0], step):
                yield embeddings[start : start + step], positions[start : start + step]

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All embeddings in KB row order: (count, D). Needs count x D x dtype bytes of memory."""
        parts = list(self.chunks())
        embeddings = torch.cat([p[0] for p in parts])
        positions = torch.cat([p[1] for p in parts])
        order = torch.argsort(positions)
        return embeddings[order], positions[order]


__all__ = [
    "EmbeddingStore",
    "check_output_dir",
    "file_sha256",
    "manifest_checksum",
    "metadata_checksum",
    "load_shard",
    "read_shard_metadata",
    "shard_name",
    "tensor_sha256",
    "write_ids",
    "write_shard",
]
