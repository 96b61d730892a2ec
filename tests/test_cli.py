"""The `vl-joint-encoder` entry point: every command starts, both option spellings work, the README reference is
the parsers' own help."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vl_joint_encoder import cli
from vl_joint_encoder.commands import reference


README = Path(__file__).resolve().parent.parent / "README.md"


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f"  {command} " in out


def test_unknown_command_is_refused(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if c != "train"])
def test_every_command_prints_its_help(command):
    text = reference.help_text(command)
    assert text.startswith(f"usage: vl-joint-encoder {command}"), text[:200]


def test_console_script_is_installed():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "vl-joint-encoder"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "extract-features" in result.stdout


def test_both_spellings_of_long_options_are_accepted(tmp_path, capsys):
    # `--output-dir` for a parser that declares `--output_dir`: parsed (then refused for the missing manifest)
    code = cli.main(["index", "--embeddings", str(tmp_path), "--output-dir", str(tmp_path / "index")])
    assert code != 0 and "has no manifest.json" in capsys.readouterr().err
    # and an option that does not exist in either spelling is still an error
    with pytest.raises(SystemExit):
        cli.main(["index", "--embeddings", str(tmp_path), "--output-dir", str(tmp_path), "--no-such-option", "1"])


def readme_reference() -> str:
    """The package commands' reference, then the conversion script's help (a separate script, not a command)."""
    import contextlib
    import io
    import os

    from conversion.convert_vl_t5_checkpoint import build_parser

    buffer, previous = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(reference.HELP_COLUMNS)
    try:
        with contextlib.redirect_stdout(buffer):
            build_parser().print_help()
    finally:
        os.environ.pop("COLUMNS") if previous is None else os.environ.__setitem__("COLUMNS", previous)
    conversion = (
        "<details><summary><code>python conversion/convert_vl_t5_checkpoint.py</code>: convert a VL-T5 / "
        f"VL-Adapter / VL-BART / T5 / BART checkpoint</summary>\n\n```text\n{buffer.getvalue().rstrip()}\n```\n\n"
        "</details>"
    )
    return reference.markdown_reference() + "\n\n" + conversion


def test_readme_cli_reference_is_the_parsers_help():
    readme = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- cli-help:begin -->\n(.*)\n<!-- cli-help:end -->", readme, re.S)
    assert block, "README.md lost its <!-- cli-help:begin/end --> markers"
    assert block.group(1).strip() == readme_reference().strip(), (
        "README's CLI reference is out of date: regenerate it with `python tests/test_cli.py` (from the repository "
        "root)"
    )


if __name__ == "__main__":  # regenerate the README's CLI reference in place
    sys.path.insert(0, str(README.parent))  # the repository root: `conversion` is importable
    text = README.read_text(encoding="utf-8")
    begin, end = "<!-- cli-help:begin -->\n", "\n<!-- cli-help:end -->"
    head, rest = text.split(begin, 1)
    README.write_text(head + begin + readme_reference() + end + rest.split(end, 1)[1], encoding="utf-8")
