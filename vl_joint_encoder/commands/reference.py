"""The README's CLI reference, generated from the commands' own parsers (a test compares the two).

    python -m vl_joint_encoder.commands.reference      # prints the markdown between the README's cli-help markers
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

from . import COMMANDS, command_module


HELP_COLUMNS = 110  # help text is wrapped at this width in the README reference
TRAINER_COMMANDS = ("train", "viquae-train")  # their --help lists all of TrainingArguments: only our options here


def help_text(command: str) -> str:
    """`vl-joint-encoder COMMAND --help` as printed at HELP_COLUMNS columns."""
    buffer = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)
    try:
        with contextlib.redirect_stdout(buffer):
            try:
                command_module(command).main(["--help"])
            except SystemExit:
                pass
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return buffer.getvalue().rstrip()


def train_options(command: str = "train") -> str:
    """`COMMAND --help` up to the TrainingArguments section (the package's options), then one line for the rest."""
    from .train import TRAINING_ARGUMENTS_TITLE

    text = help_text(command)
    head = text.split(f"\n{TRAINING_ARGUMENTS_TITLE}:", 1)[0].rstrip()
    return (
        f"{head}\n\n{TRAINING_ARGUMENTS_TITLE}:\n  every option of transformers.TrainingArguments, e.g. --output-dir, "
        "--per-device-train-batch-size,\n  --learning-rate, --num-train-epochs, --max-steps, --logging-steps "
        "(default here: 10), --eval-strategy,\n  --save-strategy, --bf16, --gradient-checkpointing, --log-level, "
        f"--resume-from-checkpoint\n  (`vl-joint-encoder {command} --help` lists them all)"
    )


def markdown_reference() -> str:
    """Each command's help as a collapsed markdown section."""
    parts = []
    for command, (_, summary) in COMMANDS.items():
        text = train_options(command) if command in TRAINER_COMMANDS else help_text(command)
        parts.append(
            f"<details><summary><code>vl-joint-encoder {command}</code>: {summary}</summary>\n\n"
            f"```text\n{text}\n```\n\n</details>"
        )
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(markdown_reference() + "\n")
