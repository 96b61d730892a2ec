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
    lines += ["", "Run `vl-joint-encoder COMMAND --help` for a command's options.",
              "`vl-joint-encoder --debug COMMAND ...` (or VL_JOINT_ENCODER_DEBUG=1) shows full tracebacks and checks "
              "GPU input values."]
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
    if argv[0] == "--debug":
        from .utils.errors import enable_debug

        enable_debug()
        return main(argv[1:])
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vl-joint-encoder: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from .utils.errors import run_guarded

    # the command's own main guards its body; this guard covers importing its module (a missing optional dependency)
    return run_guarded(f"vl-joint-encoder {command}", lambda: command_module(command).main(rest))


if __name__ == "__main__":
    sys.exit(main())
