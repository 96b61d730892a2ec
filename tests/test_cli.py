"""The `vl-joint-encoder` entry point: every command starts, both option spellings work, the README reference is
the parsers' own help."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vl_joint_encoder import cli


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
    text = cli._help_text(command)
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


def test_readme_cli_reference_is_the_parsers_help():
    readme = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- cli-help:begin -->\n(.*)\n<!-- cli-help:end -->", readme, re.S)
    assert block, "README.md lost its <!-- cli-help:begin/end --> markers"
    assert block.group(1).strip() == cli.markdown_reference().strip(), (
        "README's CLI reference is out of date: regenerate it with `python -m vl_joint_encoder.cli "
        "--markdown-reference` and paste it between the cli-help markers"
    )
