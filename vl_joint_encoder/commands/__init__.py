"""The `vl-joint-encoder` commands: one module per command, its arguments as dataclasses.

Every command is parsed the same way (`parse_arguments`): transformers' `HfArgumentParser` over the command's
dataclasses, so every option is accepted as `--long-option` and `--long_option` (the help shows the first spelling
only), and every command takes a YAML or JSON config file as its first argument, followed by `--key value`
overrides:

    vl-joint-encoder encode encode.yaml --batch-size 128

`--help` and argument errors come back before torch or transformers is imported: `HfArgumentParser` is loaded from
its own file (`hf_argparser.py` needs only the standard library and PyYAML), argument modules import nothing heavy,
and `main` imports what the command needs after parsing. (`train` is the exception for its help and its
TrainingArguments options: `TrainingArguments` is defined in a module that imports torch.)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any


# command -> (module under vl_joint_encoder.commands, one-line help)
COMMANDS = {
    "demo": ("demo", "train and evaluate a multimodal retriever end to end on embedded data"),
    "build": ("build", "make a ready encoder folder from T5 / VL-T5 / VL-Adapter + a CLIP or SigLIP tower"),
    "train": ("train", "train a joint encoder as a dense retriever (accelerate launch ...)"),
    "data-report": ("data_report", "describe queries and KB before training"),
    "extract-features": ("extract_features", "compute CLIP grid features for images"),
    "encode": ("encode", "encode a knowledge base into embedding shards"),
    "index": ("index", "build a FAISS index over encoded shards"),
    "search": ("search", "top-k search of queries over encoded shards or an index"),
    "qrels": ("qrels", "qrels (JSON or TREC) from the positives of a queries file"),
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
HELP_WIDTH = 110  # at most this many columns of help, whatever the terminal


class ArgumentError(ValueError):
    """A bad command line or config file (exit status 2, message without traceback)."""


def hf_argument_parser_class() -> type:
    """
    transformers' `HfArgumentParser`, without importing transformers (0.5 s to several seconds on a busy machine):
    its module imports only the standard library and PyYAML, so it is executed from its file under a private name.
    Falls back to the ordinary import if a future transformers gives that module other imports.
    """
    cached = sys.modules.get("_vl_joint_encoder_hf_argparser")
    if cached is not None:
        return cached.HfArgumentParser
    if "transformers" not in sys.modules:
        spec = importlib.util.find_spec("transformers")  # finds the package without importing it
        if spec is not None and spec.submodule_search_locations:
            path = os.path.join(list(spec.submodule_search_locations)[0], "hf_argparser.py")
            file_spec = importlib.util.spec_from_file_location("_vl_joint_encoder_hf_argparser", path)
            if file_spec is not None and os.path.isfile(path):
                module = importlib.util.module_from_spec(file_spec)
                try:
                    file_spec.loader.exec_module(module)
                except ImportError:  # relative imports: needs the package after all
                    pass
                else:
                    sys.modules[file_spec.name] = module
                    return module.HfArgumentParser
    from transformers import HfArgumentParser

    return HfArgumentParser


def _display_option(action: argparse.Action) -> str:
    """The one spelling the help shows: `--long-option` (also accepted: `--long_option`)."""
    dashed = [option for option in action.option_strings if option.startswith("--") and "_" not in option]
    return dashed[0] if dashed else action.option_strings[0]


class HelpFormatter(argparse.HelpFormatter):
    """
    One spelling per option (`--long-option`), `[BOOL]` for flags that take an optional true/false, and the default
    appended only when it says something (not None, not False, not already in the help text).
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 32, width: int | None = None):
        if width is None:
            import shutil

            width = min(HELP_WIDTH, shutil.get_terminal_size().columns) - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            return super()._format_action_invocation(action)
        option = _display_option(action)
        if action.nargs == 0:
            return option
        return f"{option} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, (list, tuple)) and not default)
            or action.required
            or not action.option_strings
            or action.nargs == 0
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".replace("%", "%%")


def _usage(prog: str, parser: argparse.ArgumentParser) -> str:
    """`PROG [CONFIG.yaml] --required A ... [options]`: the full list is in the help below it."""
    units = [prog, "[CONFIG.yaml|CONFIG.json]"]
    units += [
        f"{_display_option(action)} {action.metavar or action.dest.upper()}"
        for action in parser._actions
        if action.required and action.option_strings
    ]
    units.append("[options]")
    lines, indent = [units[0]], " " * (len(prog) + 8)  # 8: "usage: " and the space after PROG
    for unit in units[1:]:
        prefix = "usage: " if len(lines) == 1 else ""
        if len(prefix + lines[-1] + " " + unit) > HELP_WIDTH:
            lines.append(indent + unit)
        else:
            lines[-1] += " " + unit
    return "\n".join(lines)


def build_parser(
    dataclass_types: Sequence[type],
    prog: str,
    description: str | None = None,
    groups: Sequence[tuple[str, Sequence[type], Callable[[dataclasses.Field], bool] | None]] | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """
    An `HfArgumentParser` over `dataclass_types` with the package's help format. `groups` (title, dataclasses, field
    filter) lays the options out in titled sections in that order (e.g. the package's own options before the
    inherited TrainingArguments); without it every option is under "options".
    """
    parser_class = hf_argument_parser_class()
    parser = parser_class(
        [] if groups else list(dataclass_types), prog=prog, description=description, epilog=epilog,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    if groups:
        import typing

        parser.dataclass_types = list(dataclass_types)
        for title, types_, keep in groups:
            group = parser.add_argument_group(title)
            for dtype in types_:
                hints = typing.get_type_hints(dtype)
                for field in dataclasses.fields(dtype):
                    if field.init and (keep is None or keep(field)):
                        field = copy.copy(field)  # _parse_dataclass_field narrows field.type in place
                        field.type = hints[field.name]
                        parser_class._parse_dataclass_field(group, field)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            shown = _display_option(action)
            action.option_strings.sort(key=lambda option: option != shown)  # the shown spelling first
        if action.nargs == "?" and action.const is True and action.metavar is None:
            action.metavar = "BOOL"  # `--flag` alone means true; `--flag false` works too
        if action.dest != "help" and not action.help:
            raise RuntimeError(f"{prog}: option --{action.dest} has no help text (add metadata={{'help': ...}})")
    parser.usage = _usage(prog, parser)
    return parser


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
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str], prog: str) -> list[str]:
    """If `argv` starts with a config file, make its values the parser's defaults (options given after it win);
    returns the remaining arguments. Unknown keys are an error naming the file."""
    if not (argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES)):
        return argv
    path, rest = argv[0], argv[1:]
    values = read_config_file(path)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ArgumentError(f"{path}: unknown argument(s) {unknown} (see {prog} --help)")
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    parser.set_defaults(**values)
    return rest


def parse_arguments(
    dataclass_types: Sequence[type], argv: Sequence[str], prog: str, description: str | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> tuple:  # fmt: skip
    """
    Parse `argv` into instances of `dataclass_types` (see the module docstring). An unknown option or a bad value
    exits with status 2 through argparse (`parser.error`); a bad config file raises `ArgumentError`.
    """
    parser = parser or build_parser(dataclass_types, prog, description)
    argv = apply_config_file(parser, list(argv), prog)
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # a value refused by a dataclass's __post_init__: an argument error, as argparse's
        parser.error(str(error))


def setup_logging(level: int | str | None = None) -> None:
    """
    Log through transformers' logging: the package's loggers (`vl_joint_encoder.*`, `conversion.*`) print through
    the handler of transformers' library logger at its verbosity, so `log_level` (TrainingArguments) or
    `TRANSFORMERS_VERBOSITY` controls the package's messages too. `level`: a logging level or name, or None to keep
    transformers' current verbosity.
    """
    import logging

    from transformers.utils import logging as hf_logging

    if isinstance(level, str):
        level = hf_logging.log_levels[level.lower()] if level.lower() in hf_logging.log_levels else None
    if level is not None and level >= 0:
        hf_logging.set_verbosity(level)
    root = hf_logging.get_logger()  # "transformers": holds the handler transformers configures
    for name in ("vl_joint_encoder", "conversion"):
        ours = logging.getLogger(name)
        ours.setLevel(hf_logging.get_verbosity())
        for handler in root.handlers:
            if handler not in ours.handlers:
                ours.addHandler(handler)
        ours.propagate = False


def run_command(prog: str, main: Callable[[], int | None]) -> int:
    """Run a command's body under `utils.errors.run_guarded`: a user error (ValueError, OSError, ImportError, out of
    memory) prints `prog: error: ...` (exit status 2), any other exception one line naming it as a bug (exit
    status 1); `VL_JOINT_ENCODER_DEBUG=1` re-raises with the traceback."""
    from ..utils.errors import run_guarded

    return run_guarded(prog, main)


def check_device(value: str | None, option: str = "--device") -> None:
    """
    Refuse a `--device` this machine does not have, before any work: `cuda` without a usable GPU (a CPU-only torch,
    no driver, `CUDA_VISIBLE_DEVICES=`), `cuda:N` past the GPU count, `mps` off Apple silicon, or a name torch does
    not know. None / `auto` / `cpu` pass without importing torch.
    """
    if value is None or value in ("auto", "cpu"):
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} {value!r} is not a device torch knows: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"{option} {value}: no CUDA GPU is available here ({why}): use {option} cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{option} {value}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {value}: the Apple MPS backend is not available here: use {option} cpu")
    elif device.type != "cpu":
        available = getattr(getattr(torch, device.type, None), "is_available", None)
        if available is None or not available():
            raise ValueError(f"{option} {value}: no {device.type} device is available here: use {option} cpu")


def check_arguments(arguments: Sequence[Any]) -> None:
    """Checks every command's arguments get before its body runs (today: a `device` field is a device this machine
    has)."""
    for argument in arguments:
        if dataclasses.is_dataclass(argument) and isinstance(getattr(argument, "device", None), (str, type(None))):
            if any(f.name == "device" for f in dataclasses.fields(argument)):
                check_device(argument.device)


def command_main(prog: str, dataclass_types: Sequence[type], body: Callable[..., int | None], description: str):
    """`main(argv)` of a command: parse into `dataclass_types`, check them (`check_arguments`), then
    `body(*arguments)` under `run_command`."""

    def main(argv: Sequence[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            arguments = parse_arguments(dataclass_types, argv, prog, description)
        except ArgumentError as error:  # a bad config file
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2

        def run():
            check_arguments(arguments)
            setup_logging()
            return body(*arguments)

        return run_command(prog, run)

    main.__doc__ = f"`{prog}`: {description}"
    main.dataclass_types = list(dataclass_types)
    main.description = description
    main.prog = prog
    return main


__all__ = [
    "COMMANDS",
    "ArgumentError",
    "HelpFormatter",
    "apply_config_file",
    "build_parser",
    "check_arguments",
    "check_device",
    "command_main",
    "command_module",
    "hf_argument_parser_class",
    "parse_arguments",
    "read_config_file",
    "run_command",
    "setup_logging",
]
