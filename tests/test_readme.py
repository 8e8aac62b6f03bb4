"""The README can't rot: its Python snippets run (on tiny quickstart outputs), and every `nef-transformers` and
`examples/train.py` command it shows parses with the real argument parsers."""

import os
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["--num-items", "40", "--fit-steps", "5", "--epochs", "1", "--max-train-steps", "2", "--hidden-size", "16",
        "--num-layers", "1"]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def commands() -> list[str]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in blocks("bash"):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


def test_readme_starts_with_the_two_setup_commands():
    first = blocks("bash")[0].strip().splitlines()
    assert first == ['pip install -e ".[test]"', "python -m pytest -q"]


def test_readme_commands_parse_with_the_real_parsers():
    from nef_transformers.cli import build_parser
    from nef_transformers.training import build_parser as train_parser

    checked = 0
    for command in commands():
        tokens = shlex.split(command)
        if tokens[0] == "nef-transformers":
            build_parser().parse_args(tokens[1:])
            checked += 1
        elif "examples/train.py" in tokens:
            train_parser().parse_args(tokens[tokens.index("examples/train.py") + 1:])
            checked += 1
        elif "nef_transformers.cli" in tokens:
            build_parser().parse_args(tokens[tokens.index("nef_transformers.cli") + 1:])
            checked += 1
        elif tokens[:2] == ["python", "examples/quickstart.py"]:
            from nef_transformers.quickstart import add_arguments
            import argparse

            add_arguments(argparse.ArgumentParser()).parse_args(tokens[2:])
            checked += 1
    assert checked >= 10


@pytest.mark.timeout(600)
def test_readme_python_snippets_run(tmp_path, monkeypatch):
    from nef_transformers.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--out", "runs/quickstart", *TINY]) == 0
    assert main(["quickstart", "--strategy", "vq", "--out", "runs/quickstart-vq", *TINY]) == 0
    snippets = blocks("python")
    assert len(snippets) >= 4
    namespace: dict = {}
    for snippet in snippets:  # in order, one namespace: later snippets use earlier results, as a reader would
        exec(compile(snippet, str(README), "exec"), namespace)
    assert Path("sample.png").is_file()
    assert set(namespace["metric"].compute(predictions=namespace["generated"], references=namespace["real"],
                                           modality="image")) >= {"mmd", "cov", "one_nna"}
