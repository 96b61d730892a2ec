"""
Training checkpoints that are trusted only when complete, and launches that would train the wrong thing refused.

`Trainer` writes `checkpoint-N/` file by file (weights, `optimizer.pt`, `scheduler.pt`, `rng_state*.pth`,
`trainer_state.json`); a kill during saving leaves a half-written folder that transformers' `get_last_checkpoint`
still picks, and `Trainer` resumes without a missing `scheduler.pt` / `optimizer.pt` (other weights, silently).
Here:
- `JointEncoderTrainer._save_checkpoint` removes any folder of the same name first, lets `Trainer` write it, waits for
  every process, then writes `checkpoint_complete.json` LAST (atomically: written under a temporary name, then
  renamed), listing every file and its size; old checkpoints are rotated only after that.
- `checkpoint_problems` checks a folder before resume: the marker, every listed file at its size, and the files a
  resume needs; `last_complete_checkpoint` picks the newest complete one (skipping, with a warning, newer incomplete
  ones); `verify_resume_checkpoint` refuses an incomplete one with the fix.
- `check_launch` refuses a process that its environment says is one of several while torch.distributed runs it
  alone (`accelerate launch --num_processes 2` without `--multi_gpu`, a job manager starting N copies), and
  `training_lock` refuses two trainings writing into one output folder.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from transformers.utils import logging

from ..utils.io import read_json, write_json


logger = logging.get_logger(__name__)

COMPLETE_FILE = "checkpoint_complete.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LOCK_FILE = ".training.lock"
# what a resume needs besides the weights (the Trainer would silently go on without each of them)
RESUME_FILES = {
    "trainer_state.json": "the step, epoch and log history",
    "optimizer.pt": "the optimizer state (Adam moments)",
    "scheduler.pt": "the learning-rate schedule",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _files(folder: str) -> dict[str, int]:
    """Every file under `folder` (relative path -> size in bytes), the marker excluded."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != COMPLETE_FILE:
                sizes[relative] = os.path.getsize(path)
    return dict(sorted(sizes.items()))


def mark_complete(folder: str, global_step: int) -> None:
    """Write the marker (last, atomically): the folder's files and sizes at this moment."""
    write_json(os.path.join(folder, COMPLETE_FILE), {"global_step": int(global_step), "files": _files(folder)})


def _has_weights(folder: str) -> bool:
    from ..bi_encoder import TOWERS

    if any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        return True
    return all(any(os.path.isfile(os.path.join(folder, tower, name)) for name in WEIGHT_FILES) for tower in TOWERS)


def checkpoint_problems(folder: str) -> list[str]:
    """Why `folder` cannot be resumed from (empty list: it is complete)."""
    if not os.path.isdir(folder):
        return [f"{folder!r} is not a folder"]
    problems = []
    marker_path = os.path.join(folder, COMPLETE_FILE)
    if not os.path.isfile(marker_path):
        problems.append(f"it has no {COMPLETE_FILE} (written last when a save finishes): its saving was interrupted")
    else:
        try:
            marker = read_json(marker_path, "checkpoint marker")
            listed = dict(marker["files"])
        except (ValueError, KeyError, TypeError) as error:
            problems.append(f"its {COMPLETE_FILE} is unreadable ({error})")
            listed = {}
        for name, size in listed.items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                problems.append(f"{name} (listed in {COMPLETE_FILE}) is missing")
            elif os.path.getsize(path) != size:
                problems.append(f"{name} has {os.path.getsize(path)} bytes, {COMPLETE_FILE} says {size}")
    for name, what in RESUME_FILES.items():
        if not os.path.isfile(os.path.join(folder, name)):
            problems.append(f"{name} ({what}) is missing: resuming without it would train to other weights")
    if not _has_weights(folder):
        problems.append("it holds no model weights (model.safetensors, or query_encoder/ and passage_encoder/)")
    return problems


def checkpoint_step(folder: str) -> int | None:
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = [os.path.join(output_dir, name) for name in os.listdir(output_dir) if CHECKPOINT_PATTERN.match(name)]
    return sorted((path for path in found if os.path.isdir(path)), key=checkpoint_step)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint of `output_dir` (None if there is none); newer incomplete ones are named in a
    warning and left alone (the next save of that step replaces them)."""
    for folder in reversed(list_checkpoints(output_dir)):
        problems = checkpoint_problems(folder)
        if not problems:
            return folder
        logger.warning(f"skipping incomplete checkpoint {folder!r}: {'; '.join(problems)}")
    return None


def verify_resume_checkpoint(folder: str) -> None:
    """Raise a ValueError naming the folder, what is wrong and what to do if `folder` cannot be resumed from."""
    problems = checkpoint_problems(folder)
    if not problems:
        return
    output_dir = os.path.dirname(os.path.normpath(folder))
    complete = [path for path in list_checkpoints(output_dir) if path != folder and not checkpoint_problems(path)]
    fix = (
        f"resume from {complete[-1]!r} (the newest complete checkpoint; `--resume_from_checkpoint last` picks it)"
        if complete
        else "no other checkpoint there is complete: start the run again without --resume_from_checkpoint"
    )
    raise ValueError(f"cannot resume from checkpoint {folder!r}: {'; '.join(problems)}. Fix: {fix}")


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str) -> str | None:
    """`"last"` / True -> the newest complete checkpoint of `output_dir` (error if none); a path -> verified."""
    if resume is None or resume is False:
        return None
    if resume is True or resume == "last":
        found = last_complete_checkpoint(output_dir)
        if found is None:
            names = [os.path.basename(path) for path in list_checkpoints(output_dir)]
            detail = f" ({', '.join(names)} incomplete)" if names else ""
            raise ValueError(
                f"resume_from_checkpoint='last' but {output_dir!r} has no complete checkpoint-*{detail}: start the "
                f"run again without --resume_from_checkpoint"
            )
        logger.info(f"resuming from {found!r}, the newest complete checkpoint")
        return found
    resume = os.fspath(resume)
    verify_resume_checkpoint(resume)
    return resume


# ---------------------------------------------------------------------------------------------- launches
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def _launcher_processes(pid: int) -> int | None:
    """--num_processes of an `accelerate launch` command line of process `pid` (Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any("accelerate" in arg for arg in argv[:3]) or "launch" not in " ".join(argv[:4]):
        return None
    for index, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and index + 1 < len(argv):
                return int(argv[index + 1]) if argv[index + 1].isdigit() else None
            if arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
                return int(value) if value.isdigit() else None
    return None


def check_launch(args) -> None:
    """Refuse a process that was meant to be one of several but runs alone (two independent trainings)."""
    if args.world_size > 1:
        return
    for name in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            raise ValueError(
                f"the environment says {name}={value} processes but this one trains alone (world size 1): the "
                f"processes would train independently into one output folder. On CPU, launch with "
                f"`accelerate launch --multi_gpu --num_processes {value} --num_machines 1 --mixed_precision no "
                f"--dynamo_backend no ...` and use_cpu true; on GPUs check the launcher's distributed setup"
            )
    processes = _launcher_processes(os.getppid())
    if processes is not None and processes > 1:
        raise ValueError(
            f"`accelerate launch --num_processes {processes}` started ONE process (without --multi_gpu, accelerate "
            f"ignores --num_processes on CPU): add `--multi_gpu --num_machines 1 --mixed_precision no "
            f"--dynamo_backend no` (with use_cpu true on CPU), or drop --num_processes"
        )


@contextlib.contextmanager
def training_lock(output_dir: str, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` while training (main process only): a second training writing into
    the same folder is refused instead of mixing checkpoints."""
    if not enabled:
        yield
        return
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    handle = open(path, "a+")
    acquired = False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(
                f"another training (process {holder}) is writing into {output_dir!r}: wait for it to end, or use "
                f"another --output_dir. Several processes of ONE training need `accelerate launch --multi_gpu`"
            ) from None
        acquired = True
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        if acquired:  # the training leaves no lock file behind (a killed one leaves an unlocked, harmless one)
            with contextlib.suppress(OSError):
                os.remove(path)
        handle.close()


__all__ = [
    "COMPLETE_FILE",
    "check_launch",
    "checkpoint_problems",
    "list_checkpoints",
    "last_complete_checkpoint",
    "mark_complete",
    "resolve_resume_checkpoint",
    "training_lock",
    "verify_resume_checkpoint",
]
