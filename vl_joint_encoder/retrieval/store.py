"""On-disk format of an encoded knowledge base: safetensors shards + ids + manifest, written atomically, checked on load.

    output_dir/
      plan.json                  what is being encoded (model hash, KB fingerprint, shard layout): resume checks it
      shards/shard-00000.safetensors   "embeddings" (n, D) + "positions" (n,) int64 KB rows; metadata: shard index,
                                       plan hash, model hash, sha256 of the embeddings
      ids.json                   passage ids in KB row order (position -> id)
      manifest.json              written last: model (name, revision, weights sha256), similarity, normalized, dim,
                                 dtype, count, KB fingerprint, shard list with checksums

A directory without manifest.json is an unfinished encoding (resume it with the same command).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from ..utils.io import atomic_path, read_json


logger = logging.get_logger(__name__)

FORMAT = "vl-joint-encoder-embeddings"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
IDS = "ids.json"
SHARD_DIR = "shards"


def shard_name(index: int) -> str:
    return os.path.join(SHARD_DIR, f"shard-{index:05d}.safetensors")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (contiguous CPU copy)."""
    data = tensor.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def write_shard(
    output_dir: str | os.PathLike,
    index: int,
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    plan_hash: str,
    model_hash: str,
) -> dict:
    """Write shard `index` atomically (temp file, then os.replace): a crash never leaves a complete-looking shard."""
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
    if verify and tensor_sha256(embeddings) != metadata.get("sha256"):
        raise ValueError(f"shard {os.fspath(path)!r} is corrupted (checksum mismatch): delete it and re-run encode")
    return embeddings, positions, metadata


class EmbeddingStore:
    """
    A finished encoding directory: `manifest`, `ids` (position -> passage id), `similarity`, `model_hash`, and
    `chunks(rows)` yielding (embeddings, positions) from the shards. Opening checks the manifest against the shard
    files (count, model, no stray shards from another model); `verify=True` also checks every shard's checksum.
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
        rows = sum(int(entry["rows"]) for entry in self.manifest["shards"])
        if rows != self.count:
            raise ValueError(f"shards hold {rows} rows but the manifest counts {self.count}: re-run encode")

    def chunks(self, max_rows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(embeddings (n, D), positions (n,)) per shard, split into pieces of at most `max_rows` rows."""
        for entry in self.manifest["shards"]:
            embeddings, positions, metadata = load_shard(os.path.join(self.directory, entry["file"]), self.verify)
            if metadata.get("sha256") != entry["sha256"] or embeddings.shape[0] != int(entry["rows"]):
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


__all__ = ["EmbeddingStore", "load_shard", "read_shard_metadata", "shard_name", "tensor_sha256", "write_shard"]
