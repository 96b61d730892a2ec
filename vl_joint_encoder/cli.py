"""`vl-joint-encoder COMMAND ...` (also `python -m vl_joint_encoder COMMAND ...`): the dispatcher, nothing else.

Each command is a module of `vl_joint_encoder.commands` with a `main(argv)`; it is imported only when its command
runs, so `vl-joint-encoder --help` answers at once and a missing optional dependency only breaks the command that
needs it.
"""

from __future__ import annotations

import sys

from .commands import COMMANDS, command_module


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: vl-joint-encoder COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `vl-joint-encoder COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vl-joint-encoder: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return int(command_module(command).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
