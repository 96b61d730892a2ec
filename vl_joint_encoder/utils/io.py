"""Files written atomically, JSON read with errors that name the file: the one implementation the package uses.

Every artefact (shards, manifests, runs, indexes, cards) is written to a temporary name in the target's own folder
and renamed into place (`os.replace` is atomic on POSIX within one filesystem), so a crash or a kill never leaves a
half-written file under the final name, and a reader sees either the old file or the new one.
Temporary names are `.{name}.tmp-{pid}-{random}`: hidden, per process (several ranks may write side by side), and
removed when the write fails. What a killed process left behind (its process no longer runs) is removed by the next
write of the same file, so interrupted runs leave no litter once resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import Any


def temporary_name(path: str | os.PathLike) -> str:
    """A hidden temporary path next to `path`, unique to this process and call."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files / folders of `path` left by processes that no longer run (and the `name.tmp` /
    `name.tmp-{pid}` names of earlier versions of the package). Returns what was removed."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    folder = folder or "."
    if not os.path.isdir(folder):
        return []
    removed = []
    for entry in os.listdir(folder):
        pid = None
        if entry.startswith(f".{name}.tmp-"):
            pid = entry[len(f".{name}.tmp-"):].split("-", 1)[0]
        elif entry.startswith(f"{name}.tmp-"):
            pid = entry[len(f"{name}.tmp-"):]
        elif entry != f"{name}.tmp":
            continue
        if pid is not None and pid.isdigit() and _process_alive(int(pid)) and int(pid) != os.getpid():
            continue  # another live process is writing it
        _remove(os.path.join(folder, entry))
        removed.append(entry)
    return removed


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """
    Yield a temporary path to write `path` with any library (safetensors `save_file`, `faiss.write_index`,
    `np.save`, `Dataset.save_to_disk`, a whole folder); on success it is renamed to `path` (a file or folder
    already there is replaced), on error it is removed and `path` is left as it was.

        with atomic_path("index/faiss.index") as tmp:
            faiss.write_index(index, tmp)
    """
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path) and not os.path.islink(path):
            # os.replace cannot replace a non-empty folder: move the old one aside, then drop it
            old = temporary_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """`open(path, mode)` whose content appears under `path` only once the block ends without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path) as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, payload: Any, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write `payload` as JSON to `path` atomically."""
    with atomic_write(path) as handle:
        json.dump(payload, handle, indent=indent, sort_keys=sort_keys)
        handle.write("\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing file or a syntax error raises a ValueError naming the file (and line)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path!r} is a folder, not a file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path!r} is not UTF-8 text ({error.reason}): not a JSON file") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} {path!r} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "atomic_path",
    "atomic_write",
    "read_json",
    "remove_stale_temporaries",
    "sha256_file",
    "temporary_name",
    "write_json",
    "write_text",
]
