"""The README's Python code blocks run as written (those that need no network or user data)."""

import os
import re
from pathlib import Path

import pytest


README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"(<!-- no-test[^>]*-->\n)?```python\n(.*?)```", text, re.S):
        if match.group(1) is None:
            line = text[: match.start()].count("\n") + 1
            blocks.append((line, match.group(2)))
    return blocks


def test_readme_has_runnable_python_blocks():
    assert len(python_blocks()) >= 3


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__readme__"}
    for line, code in python_blocks():
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"README.md code block at line {line} failed: {error!r}") from error
    assert os.path.isdir("my-encoder") and os.path.isdir("pipeline")
