"""`vl-joint-encoder COMMAND ...`: one entry point, each command a module with its own `main(argv)`."""

from __future__ import annotations

import importlib
import sys


# command -> (module, function, one-line help). Modules are imported only when their command runs, so that
# `vl-joint-encoder --help` is instant and a missing optional dependency only breaks the command that needs it.
COMMANDS = {
    "demo": ("vl_joint_encoder.demo", "main", "train and evaluate a multimodal retriever end to end on embedded data"),
    "smoke": ("vl_joint_encoder.smoke", "main", "build a tiny joint encoder, embed a (question, image), reload it"),
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


if __name__ == "__main__":
    sys.exit(main())


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
