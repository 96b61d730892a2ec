"""The `vl-joint-encoder` commands: one module per command, its arguments as dataclasses.

Every command is parsed the same way (`parse_arguments`): transformers' `HfArgumentParser` over the command's
dataclasses, so every option is accepted as `--long_option` and `--long-option`, and every command takes a YAML or
JSON config file as its first argument, followed by `--key value` overrides:

    vl-joint-encoder encode encode.yaml --batch_size 128

Argument modules import neither torch nor the package's heavy modules: `--help` and argument errors come back
before any of them is loaded; `main` imports what the command needs after parsing.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any


# command -> (module under vl_joint_encoder.commands, one-line help)
COMMANDS = {
    "demo": ("demo", "train and evaluate a multimodal retriever end to end on embedded data"),
    "train": ("train", "train a joint encoder as a dense retriever (accelerate launch ...)"),
    "data-report": ("data_report", "describe queries and KB before training"),
    "extract-features": ("extract_features", "compute CLIP grid features for images"),
    "encode": ("encode", "encode a knowledge base into embedding shards"),
    "index": ("index", "build a FAISS index over encoded shards"),
    "search": ("search", "top-k search of queries over encoded shards or an index"),
    "evaluate": ("evaluate", "IR metrics of a run against qrels (ranx)"),
    "fuse": ("fuse", "late fusion of runs (ranx), weights given or tuned on validation"),
    "viquae-prepare": ("viquae_prepare", "ViQuAE as published -> relevance, BM25 runs and negatives, qrels"),
    "viquae-train": ("viquae_train", "train on prepared ViQuAE (accelerate launch ...)"),
    "viquae-search": ("viquae_search", "dense run of a trained model over the ViQuAE passages"),
    "viquae-negatives": ("viquae_negatives", "positives/negatives columns of a key from runs (mining)"),
    "viquae-evaluate": ("viquae_evaluate", "metric table of runs on answer-extended qrels, as the authors"),
}


def command_module(command: str):
    """The module implementing `command` (imported on demand)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[command][0]}")


CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


class ArgumentError(ValueError):
    """A bad command line or config file (exit status 2, message without traceback)."""


def read_config_file(path: str) -> dict[str, Any]:
    """The `{option: value}` mapping of a YAML / JSON config file, with errors that name the file and line."""
    if not os.path.isfile(path):
        raise ArgumentError(f"config file {path!r} does not exist")
    if path.endswith(".json"):
        import json

        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except json.JSONDecodeError as error:
            raise ArgumentError(f"{path}:{error.lineno}:{error.colno}: invalid JSON ({error.msg})") from None
    else:
        import yaml

        try:
            with open(path, encoding="utf-8") as handle:
                values = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ArgumentError(f"{where}: invalid YAML ({problem})") from None
    if values is None:
        raise ArgumentError(f"config file {path!r} is empty: write one `option: value` per line")
    if not isinstance(values, dict):
        raise ArgumentError(
            f"config file {path!r} holds a {type(values).__name__}, not a mapping: write one `option: value` per line"
        )
    return values


def parse_arguments(
    dataclass_types: Sequence[type], argv: Sequence[str], prog: str, description: str | None = None
) -> tuple:
    """
    Parse `argv` into instances of `dataclass_types` (see the module docstring). An unknown option or a bad value
    exits with status 2 through argparse (`parser.error`); a bad config file raises `ArgumentError`.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(dataclass_types), prog=prog, description=description)
    argv = list(argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        path = argv.pop(0)
        values = read_config_file(path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ArgumentError(f"{path}: unknown argument(s) {unknown} (see {prog} --help)")
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # a value refused by a dataclass's __post_init__: an argument error, as argparse's
        parser.error(str(error))


def run_command(prog: str, main: Callable[[], int | None]) -> int:
    """Run a command's body; a ValueError / OSError (a bad input) is printed as `prog: error: ...`, exit status 2."""
    try:
        return int(main() or 0)
    except (ValueError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


def command_main(prog: str, dataclass_types: Sequence[type], body: Callable[..., int | None], description: str):
    """`main(argv)` of a command: parse into `dataclass_types`, then `body(*arguments)` under `run_command`."""

    def main(argv: Sequence[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            arguments = parse_arguments(dataclass_types, argv, prog, description)
        except ArgumentError as error:  # a bad config file
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2
        return run_command(prog, lambda: body(*arguments))

    main.__doc__ = f"`{prog}`: {description}"
    return main


__all__ = [
    "COMMANDS",
    "ArgumentError",
    "command_main",
    "command_module",
    "parse_arguments",
    "read_config_file",
    "run_command",
]
