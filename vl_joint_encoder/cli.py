"""`vl-joint-encoder COMMAND ...`: one entry point, each command a module with its own `main(argv)`."""

from __future__ import annotations

import importlib
import sys


# command -> (module, function, one-line help). Modules are imported only when their command runs, so that
# `vl-joint-encoder --help` is instant and a missing optional dependency only breaks the command that needs it.
COMMANDS = {
    "demo": ("vl_joint_encoder.demo", "main", "train and evaluate a multimodal retriever end to end on embedded data"),
    "train": ("vl_joint_encoder.train", "main", "train a joint encoder as a dense retriever (accelerate launch ...)"),
    "data-report": ("vl_joint_encoder.data_report", "main", "describe queries and KB before training"),
    "extract-features": ("vl_joint_encoder.extract_features", "main", "compute CLIP grid features for images"),
    "encode": ("vl_joint_encoder.encode", "main", "encode a knowledge base into embedding shards"),
    "index": ("vl_joint_encoder.search", "index_main", "build a FAISS index over encoded shards"),
    "search": ("vl_joint_encoder.search", "search_main", "top-k search of queries over encoded shards or an index"),
    "evaluate": ("vl_joint_encoder.ir_metrics", "main", "IR metrics of a run against qrels (values equal ranx's)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: vl-joint-encoder COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `vl-joint-encoder COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--markdown-reference":  # for maintainers: the README's CLI reference (tests compare the two)
        print(markdown_reference())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vl-joint-encoder: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    result = getattr(module, function_name)(rest)
    return int(result or 0)



def accept_both_spellings(parser):
    """
    Let every `--long_option` also be written `--long-option` (and the reverse), as HfArgumentParser does for `train`,
    so that users need not remember which command uses which spelling. `--help` shows the canonical spelling.
    """
    for action in list(parser._actions):
        for option in list(action.option_strings):
            if not option.startswith("--"):
                continue
            name = option[2:]
            alternative = "--" + (name.replace("_", "-") if "_" in name else name.replace("-", "_"))
            if alternative != option and alternative not in parser._option_string_actions:
                parser._option_string_actions[alternative] = action
    return parser


HELP_COLUMNS = 110  # help text is wrapped at this width in the README reference


def _help_text(command: str) -> str:
    """`vl-joint-encoder COMMAND --help` as printed at HELP_COLUMNS columns."""
    import contextlib
    import io
    import os

    module_name, function_name, _ = COMMANDS[command]
    buffer = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)
    try:
        with contextlib.redirect_stdout(buffer):
            try:
                getattr(importlib.import_module(module_name), function_name)(["--help"])
            except SystemExit:
                pass
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return buffer.getvalue().rstrip()


def _train_options() -> str:
    """`train` accepts every `TrainingArguments` option; the reference lists the ones this package adds."""
    import dataclasses

    from transformers import TrainingArguments

    from .train import DataArguments, ModelArguments
    from .trainer import JointEncoderTrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    lines = [
        "usage: vl-joint-encoder train CONFIG.yaml|CONFIG.json [--option value ...]",
        "       vl-joint-encoder train --model_name_or_path M --train_queries Q --kb KB --output_dir OUT [...]",
        "",
        "Every transformers TrainingArguments option is accepted (see `vl-joint-encoder train --help`), plus:",
    ]
    for group in (ModelArguments, DataArguments, JointEncoderTrainingArguments):
        lines.append(f"\n{group.__name__}:")
        for field in dataclasses.fields(group):
            if group is JointEncoderTrainingArguments and field.name in inherited and field.name != "remove_unused_columns":
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
    """The README's CLI reference: each command's help output, generated from the parsers themselves."""
    parts = []
    for command in COMMANDS:
        text = _train_options() if command == "train" else _help_text(command)
        parts.append(
            f"<details><summary><code>vl-joint-encoder {command}</code>: {COMMANDS[command][2]}</summary>\n\n"
            f"```text\n{text}\n```\n\n</details>"
        )
    import os

    conversion = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conversion")
    if os.path.isdir(conversion):
        import contextlib
        import io

        sys.path.insert(0, os.path.dirname(conversion))
        try:
            from conversion.convert_vl_t5_checkpoint import build_parser
        finally:
            sys.path.pop(0)
        previous = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = str(HELP_COLUMNS)
        try:
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                build_parser().print_help()
        finally:
            if previous is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = previous
        parts.append(
            "<details><summary><code>python conversion/convert_vl_t5_checkpoint.py</code>: convert a VL-T5 / "
            f"VL-Adapter / T5 checkpoint</summary>\n\n```text\n{buffer.getvalue().rstrip()}\n```\n\n</details>"
        )
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
