"""How a command ends on an error: one line that names the cause, never a raw traceback (unless asked for).

Every `vl-joint-encoder` command and the converter's command line run their body under `run_guarded`:

- a *user error* (a bad input, file or environment: `ValueError` and its subclasses such as `ArgumentError`,
  `ConversionError`, `ImageLoadError`; `OSError` (missing file, permission, disk full); `ImportError` (a missing
  optional dependency); `MemoryError` and out-of-GPU-memory) prints `PROG: error: MESSAGE` on stderr, exit status 2;
  the messages name the file, the field and the fix;
- anything else is a bug of the package (or of a library under it): one line `PROG: internal error: TYPE: MESSAGE
  (at FILE:LINE in FUNCTION)` and how to get the traceback, exit status 1;
- Ctrl-C prints `PROG: interrupted`, exit status 130 (what shells use for SIGINT).

With the environment variable `VL_JOINT_ENCODER_DEBUG=1` (or `vl-joint-encoder --debug COMMAND ...`, which sets it)
every exception is re-raised with its full traceback, and `JointEncoderModel.forward` also checks the values of GPU
inputs (NaN / inf features and boxes, 0/1 masks, empty pooling sets), checks it makes on CPU tensors only by default
because reading a GPU tensor's values synchronises the device.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


DEBUG_ENV = "VL_JOINT_ENCODER_DEBUG"  # read by modeling_joint_encoder too (remote code: it cannot import this module)
USER_ERRORS = (ValueError, OSError, ImportError, MemoryError)
INTERNAL_ERROR_STATUS = 1
USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130


def debug_enabled() -> bool:
    """Whether `VL_JOINT_ENCODER_DEBUG` asks for tracebacks and GPU value checks (any value but '', 0, false, no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def enable_debug() -> None:
    """Turn debugging on for this process and its children (what `vl-joint-encoder --debug` does)."""
    os.environ[DEBUG_ENV] = "1"


def is_out_of_memory(error: BaseException) -> bool:
    """torch's out-of-memory errors (CUDA, MPS, XPU), without importing torch."""
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()[:200]


def is_user_error(error: BaseException) -> bool:
    """An error the user can fix (see the module docstring), as opposed to a bug."""
    return isinstance(error, USER_ERRORS) or (isinstance(error, RuntimeError) and is_out_of_memory(error))


def _message(error: BaseException) -> str:
    text = str(error).strip()
    if not text and isinstance(error, KeyError) and error.args:
        text = repr(error.args[0])
    return text or "(no message)"


def describe_error(error: BaseException) -> str:
    """The message printed for a user error: the exception's own message, with the fix for errors whose message
    says none (a missing module, an out-of-memory)."""
    if isinstance(error, ImportError) and getattr(error, "name", None) and str(error).startswith("No module named"):
        return f"{error}: install it (pip install {error.name.split('.')[0]}, or pip install 'vl-joint-encoder[all]')"
    if isinstance(error, MemoryError) or is_out_of_memory(error):
        return (
            f"out of memory ({type(error).__name__}: {_message(error).splitlines()[0]}): lower the batch size "
            f"(--batch_size / --per_device_train_batch_size) or the max length, or use a machine with more memory"
        )
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, PermissionError)) and error.errno:
        if error.errno == 28:  # ENOSPC
            return f"no space left on the device ({error}): free some disk space or write elsewhere"
    return _message(error)


def where(error: BaseException) -> str:
    """`FILE:LINE in FUNCTION` of the innermost frame of the traceback (where the bug is)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "unknown location"
    frame = frames[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"


def run_guarded(prog: str, body: Callable[[], int | None]) -> int:
    """Run `body`; map its exceptions to one line on stderr and an exit status (see the module docstring)."""
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except SystemExit:
        raise
    except Exception as error:
        if debug_enabled():
            raise
        if is_user_error(error):
            print(f"{prog}: error: {describe_error(error)}", file=sys.stderr)
            return USER_ERROR_STATUS
        print(
            f"{prog}: internal error: {type(error).__name__}: {_message(error).splitlines()[0]} (at {where(error)}). "
            f"This is a bug, not a problem with your input: please report it with the traceback that "
            f"{DEBUG_ENV}=1 (or `vl-joint-encoder --debug ...`) prints",
            file=sys.stderr,
        )
        return INTERNAL_ERROR_STATUS


__all__ = [
    "DEBUG_ENV",
    "USER_ERRORS",
    "debug_enabled",
    "describe_error",
    "enable_debug",
    "is_user_error",
    "run_guarded",
]
