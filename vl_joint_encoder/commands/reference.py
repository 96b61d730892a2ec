"""The README's CLI reference, generated from the commands' own parsers (a test compares the two).

    python -m vl_joint_encoder.commands.reference      # prints the markdown between the README's cli-help markers
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    """`train` / `viquae-train` accept every `TrainingArguments` option; the reference lists the ones this package
    adds."""
    from transformers import TrainingArguments

    from ..training.arguments import JointEncoderTrainingArguments
    from .train import DataArguments, ModelArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    if command == "train":
        groups = (ModelArguments, DataArguments, JointEncoderTrainingArguments)
        example = "--model_name_or_path M --train_queries Q --kb KB --output_dir OUT [...]"
    else:
        from .viquae_common import ViquaeInputArguments, ViquaeSourceArguments
        from .viquae_train import ViquaeTrainArguments

        groups = (ModelArguments, ViquaeSourceArguments, ViquaeInputArguments, ViquaeTrainArguments,
                  JointEncoderTrainingArguments)  # fmt: skip
        example = "--model_name_or_path M --questions PREPARED --output_dir OUT [...]"
    lines = [
        f"usage: vl-joint-encoder {command} CONFIG.yaml|CONFIG.json [--option value ...]",
        f"       vl-joint-encoder {command} {example}",
        "",
        f"Every transformers TrainingArguments option is accepted (see `vl-joint-encoder {command} --help`), plus:",
    ]
    for group in groups:
        lines.append(f"\n{group.__name__}:")
        for field in dataclasses.fields(group):
            if not field.init or (
                group is JointEncoderTrainingArguments and field.name in inherited and field.name != "remove_unused_columns"
            ):
                continue
            if field.default is not dataclasses.MISSING:
                default = f" (default: {field.default!r})"
            elif field.default_factory is not dataclasses.MISSING:
                default = f" (default: {field.default_factory()!r})"
            else:
                default = " (required)"
            lines.append(f"  --{field.name}{default}: {field.metadata.get('help', '')}")
    return "\n".join(lines)


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
