"""The manuals in docs/ and the README tell the truth: their flag tables are the commands' flags, and their
runnable examples run as written.

Conventions for writers of docs/*.md and README.md (an HTML comment on the line right before the thing):

- `<!-- flags: COMMAND -->` before a markdown table whose first column is `flag`: the backticked words
  starting with `-` in that column (`--model PATH`, `--prompt TEXT`, `-p` gives `--model`, `--prompt`,
  `-p`) must equal the option strings of `mlx-xglm COMMAND` (`-h/--help` aside), both ways. Every command
  has exactly one such table in docs/, and every table headed `flag` carries the marker.
- `<!-- run -->` before a fenced code block makes it runnable. All runnable blocks of one file run in
  order in one fresh temporary folder (the current directory), offline (`HF_HUB_OFFLINE=1`), so a file
  first makes what its examples need (`mlx-xglm tiny --mlx-path tiny-xglm`, a text file) and later
  blocks use it. A `bash` block runs as one `bash -e` script; a `console` block runs each `$ command`
  (continued over lines ending in a backslash) and ignores the output shown, which is a sample (speeds
  vary); a `python` block runs as a script. Each must exit with status 0.
- `<!-- run: exact -->` on a `console` block also requires each command's stdout and stderr together to
  equal the lines shown under it; `<!-- run: status N -->` requires exit status N instead of 0 (both:
  `<!-- run: exact, status 1 -->`, as for the error lines of docs/errors.md).

Unmarked blocks are not run: those that need the Hub (facebook/xglm-564M), a GPU, a second machine or a
server left running. Keep the same command shape in a marked block on the tiny checkpoint.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_xglm.cli.main import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
TIMEOUT = 300  # seconds, a generous bound for one block: each takes seconds on an idle machine

RUN = re.compile(
    r"^<!--\s*run(?::\s*(?P<options>[^>]*?))?\s*-->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S | re.M
)
FLAGS = re.compile(r"^<!--\s*flags:\s*(?P<command>[\w-]+)\s*-->\n(?P<table>(?:\|.*\n?)+)", re.M)
MARKER = re.compile(r"^<!--\s*run\b", re.M)
HEADED_FLAG = re.compile(r"^\| *flag *\|", re.M)


@functools.cache
def command_flags(command: str) -> frozenset[str]:
    """The option strings of `mlx-xglm COMMAND`, as its parser (the one `--help` prints) has them."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a.choices, dict))
    parser = subparsers.choices[command]
    return frozenset(o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help"))


def table_flags(table: str) -> set[str]:
    """The flags a table documents: backticked words starting with `-` in each row's first cell."""
    rows = table.strip().splitlines()[2:]  # past the header and the |---| line
    cells = [row.split("|")[1] for row in rows]
    return {word.split()[0] for cell in cells for word in re.findall(r"`(-[^`]*)`", cell)}


def flag_tables() -> list[tuple[str, str, str]]:
    return [
        (page.name, m["command"], m["table"])
        for page in PAGES
        for m in FLAGS.finditer(page.read_text(encoding="utf-8"))
    ]


@pytest.mark.parametrize(
    ("page", "command", "table"), [pytest.param(*t, id=f"{t[0]}:{t[1]}") for t in flag_tables()]
)
def test_flag_table_equals_the_commands_flags(page, command, table):
    documented, real = table_flags(table), command_flags(command)
    assert documented - real == set(), f"{page}: flags of mlx-xglm {command} that do not exist"
    assert real - documented == set(), f"{page}: flags of mlx-xglm {command} missing from its table"


def test_every_command_has_one_flag_table_in_docs():
    in_docs = [command for page, command, _ in flag_tables() if page != "README.md"]
    assert sorted(in_docs) == sorted(COMMANDS)


def test_every_flag_table_is_marked():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        marked = sum(HEADED_FLAG.search(m["table"]) is not None for m in FLAGS.finditer(text))
        assert len(HEADED_FLAG.findall(text)) == marked, f"{page.name}: a flag table without <!-- flags: -->"


def test_readme_links_every_manual():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert DOCS, "docs/ has no manuals"
    for doc in DOCS:
        assert f"docs/{doc.name}" in readme


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLX_XGLM_DEBUG", None)
    env["COLUMNS"] = "100"
    return env


def console_commands(body: str) -> list[tuple[str, list[str]]]:
    """`$ command` lines (joined over trailing backslashes) with the output lines shown after each."""
    steps: list[tuple[str, list[str]]] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith("$ "):
            assert steps, f"console block starts with output, not a command: {line!r}"
            steps[-1][1].append(line)
            continue
        command = line[2:]
        while command.endswith("\\") and i < len(lines):
            command = command[:-1] + lines[i]
            i += 1
        steps.append((command, []))
    return steps


def run_block(lang: str, options: str, body: str, cwd: Path) -> None:
    env = environment()
    if lang == "python":
        result = subprocess.run(
            [sys.executable, "-c", body], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
        assert result.returncode == 0, f"python block failed:\n{body}\n{result.stderr}"
        return
    if lang == "bash":
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", body],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert result.returncode == 0, f"bash block failed:\n{body}\n{result.stderr}"
        return
    assert lang == "console", f"runnable blocks are bash, console or python, not {lang}"
    exact = "exact" in options
    status = int(m[1]) if (m := re.search(r"status\s+(\d+)", options)) else 0
    for command, shown in console_commands(body):
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT,
        )
        assert result.returncode == status, f"$ {command}\n{result.stdout}"
        if exact:
            assert result.stdout.splitlines() == shown, f"$ {command}"


def runnable_blocks(page: Path) -> list[tuple[str, str, str]]:
    text = page.read_text(encoding="utf-8")
    return [(m["lang"], m["options"] or "", m["body"]) for m in RUN.finditer(text)]


@pytest.mark.parametrize("page", [p for p in PAGES if runnable_blocks(p)], ids=lambda p: p.name)
def test_examples_run_as_written(page, tmp_path):
    for lang, options, body in runnable_blocks(page):
        run_block(lang, options, body, tmp_path)


def test_every_fenced_block_after_a_run_marker_is_found():
    """A marker separated from its block (a blank line, a typo in the language) would silently not run."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        markers = len(MARKER.findall(text))
        assert markers == len(runnable_blocks(page)), f"{page.name}: a <!-- run --> marker not before a block"


def test_console_commands_join_continuations_and_keep_output():
    body = "$ echo a \\\n  b\na b\n$ true"
    assert console_commands(body) == [("echo a   b", ["a b"]), ("true", [])]
    assert shlex.split(console_commands(body)[0][0]) == ["echo", "a", "b"]
