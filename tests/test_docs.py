"""Docs that stay true: the commands, links and examples of README.md and docs/*.md.

- **Commands.** Every fenced block tagged bash/sh/shell/console (or untagged and containing
  ``python -m jemfast``) in README.md, docs/*.md and tune/README.md is read as shell: lines
  joined at a trailing backslash, split into simple commands at ``&&``, ``||``, ``;``, ``|`` and
  newlines, ``# comments`` dropped, ``$VAR``/``${VAR}`` and ``<placeholder>`` replaced by a dummy
  value (``1``). Each ``python -m jemfast.<mod> ...`` and ``torchrun ... -m jemfast.<mod> ...``
  has its arguments checked against the real parser of that module (``build_parser()``, see
  PARSERS): every ``--flag`` must be one of the parser's own option strings, spelled in full (an
  abbreviation that argparse would accept today breaks when a flag is added), and
  ``parse_known_args`` must accept the whole line with nothing left over. Only parsing: nothing
  trains, nothing is written. A failure names the file, the line and the flag.
- **Links.** Every relative link and image (``[..](path)``, ``![..](path)``, reference
  definitions, ``<img src>``) in README.md and docs/*.md resolves to an existing file or folder;
  an ``#anchor`` into a Markdown file must be the GitHub slug of one of its headings (lowercase,
  punctuation other than ``-`` and ``_`` dropped, spaces to ``-``, ``-1``, ``-2`` for repeats).
- **Runnable examples.** A Python block whose fence is directly preceded by the line
  ``<!-- docs-test: run -->`` is a whole program and is run in a subprocess (timeout RUN_TIMEOUT_S)
  that must exit 0. The rule for marking: the block imports what it uses, defines every other
  name it uses, and runs on a CPU in seconds. Fragments of someone else's script (``args``,
  ``model`` defined elsewhere) and long runs (a whole training) stay unmarked.
- **README's commands.** The second block is what CI runs (.ci/run's install and test command);
  the quickstart's timing sentence is the one line right above the first block.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND_DOCS = [*DOCS, REPO / "tune" / "README.md"]
SHELL_TAGS = {"bash", "sh", "shell", "console", "zsh"}
RUN_MARKER = "<!-- docs-test: run -->"
RUN_TIMEOUT_S = 120
DUMMY = "1"  # what $VAR and <placeholder> become: a valid int, float, path and name
# `python -m MODULE` -> (module, function) that builds its argparse parser without side effects
PARSERS = {
    "jemfast.train": ("jemfast.options.cli", "build_parser"),
    "jemfast.eval": ("jemfast.eval.options", "build_parser"),
    "jemfast.tune": ("jemfast.tune.cli", "build_parser"),
    "jemfast.natural_divergence": ("jemfast.natural_divergence", "build_parser"),
    "jemfast.compat": ("jemfast.compat.__main__", "build_parser"),
}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---- fenced blocks ------------------------------------------------------------------------------
@dataclass
class Block:
    path: Path
    line: int           # 1-based line of the block's first content line
    tag: str            # first word of the info string, lowercased ("" if none)
    lines: list[str]    # content, the fence's indentation removed
    marked: bool        # RUN_MARKER is the line right before the fence


FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m.group("indent"), m.group("fence")
        body, j = [], i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped and set(stripped) == {fence[0]} and len(stripped) >= len(fence):
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        tag = (m.group("info").split() or [""])[0].lower()
        marked = i > 0 and lines[i - 1].strip() == RUN_MARKER
        out.append(Block(path, i + 2, tag, body, marked))
        i = j + 1
    return out


# ---- shell commands -------------------------------------------------------------------------------
@dataclass
class Command:
    path: Path
    line: int
    module: str
    args: list[str]
    text: str


OPERATORS = {"&&", "||", ";", "|", "&", ";;"}


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, text) of each shell line, backslash continuations joined."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for k, raw in enumerate(block.lines):
        text = raw
        if block.tag == "console" and not pending:
            if not text.lstrip().startswith("$ "):
                continue  # output, not a command
            text = text.lstrip()[2:]
        if not pending:
            start = block.line + k
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        out.append((start, pending + text))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def substitute(text: str) -> str:
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}|\$[A-Za-z_][A-Za-z0-9_]*", DUMMY, text)
    return re.sub(r"<[A-Za-z][^<>]*>", DUMMY, text)


def simple_commands(text: str) -> list[list[str]]:
    lex = shlex.shlex(substitute(text), posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    commands, current = [], []
    for tok in lex:
        if tok in OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(tok)
    commands.append(current)
    out = []
    for cmd in commands:
        for k, tok in enumerate(cmd):  # a redirection ends the arguments
            if re.match(r"^\d*[<>]", tok):
                cmd = cmd[:k]
                break
        while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):  # FOO=1 python ...
            cmd = cmd[1:]
        if cmd:
            out.append(cmd)
    return out


def jemfast_invocation(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) for `python -m jemfast...` / `torchrun ... -m jemfast...`."""
    prog = os.path.basename(tokens[0])
    if not (re.fullmatch(r"python(\d(\.\d+)?)?", prog) or prog == "torchrun"):
        return None
    for k in range(1, len(tokens) - 1):
        if tokens[k] in ("-m", "--module") and tokens[k + 1].split(".")[0] == "jemfast":
            return tokens[k + 1], tokens[k + 2:]
        if prog != "torchrun" and not tokens[k].startswith("-"):
            return None  # `python script.py ...`
    return None


def shell_block(block: Block) -> bool:
    if block.tag in SHELL_TAGS:
        return True
    return block.tag == "" and any("python -m jemfast" in line for line in block.lines)


def doc_commands(path: Path) -> list[Command]:
    out = []
    for block in fenced_blocks(path):
        if not shell_block(block):
            continue
        for line, text in logical_lines(block):
            for tokens in simple_commands(text):
                found = jemfast_invocation(tokens)
                if found:
                    out.append(Command(path, line, found[0], found[1], " ".join(text.split())))
    return out


def parser_for(module: str):
    where, name = PARSERS[module]
    return getattr(importlib.import_module(where), name)()


def option_strings(parser) -> set[str]:
    """Every option string of the parser and of its subcommands' parsers."""
    out = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= option_strings(sub)
    return out


def check_command(cmd: Command) -> list[str]:
    """Problems with one command, each naming the file, the line and the flag."""
    where = f"{rel(cmd.path)}:{cmd.line}: python -m {cmd.module}"
    if cmd.module not in PARSERS:
        return [f"{where}: no parser known for module {cmd.module} (add it to PARSERS in tests/test_docs.py)"]
    parser = parser_for(cmd.module)
    known = option_strings(parser)
    problems = []
    for tok in cmd.args:
        if not tok.startswith("-") or tok == "-" or re.fullmatch(r"-\d[\d.e+-]*", tok):
            continue
        flag = tok.split("=", 1)[0]
        if flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{where}: unknown flag {flag}{hint}\n    {cmd.text}")
    if problems:
        return problems
    args = [a for a in cmd.args if a not in ("-h", "--help")]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _, rest = parser.parse_known_args(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return [f"{where}: the parser rejects it: {err.getvalue().strip()}\n    {cmd.text}"]
        return []
    if rest:
        return [f"{where}: unrecognized arguments {' '.join(rest)}\n    {cmd.text}"]
    return []


@pytest.mark.parametrize("path", COMMAND_DOCS, ids=rel)
def test_doc_commands_parse(path):
    problems = [p for cmd in doc_commands(path) for p in check_command(cmd)]
    assert not problems, "commands in the docs that the CLI would refuse:\n" + "\n".join(problems)


def test_doc_commands_are_found():
    """The checks above see the commands: every documented CLI appears at least once."""
    found = [cmd for path in COMMAND_DOCS for cmd in doc_commands(path)]
    assert {cmd.module for cmd in found} >= set(PARSERS), sorted({cmd.module for cmd in found})
    assert len(found) >= 15, [f"{rel(c.path)}:{c.line}" for c in found]
    # a renamed flag is caught, with file, line and flag
    fake = Command(REPO / "docs" / "training.md", 1, "jemfast.train", ["--dataset", "digits", "--sgld-stepz", "5"],
                   "python -m jemfast.train --dataset digits --sgld-stepz 5")
    (problem,) = check_command(fake)
    assert "docs/training.md:1" in problem and "unknown flag --sgld-stepz" in problem, problem


def test_shell_parsing():
    block = Block(REPO / "x.md", 10, "bash", [
        "python -m jemfast.train --dataset digits --out $OUT  # a comment --nope",
        "torchrun --nproc_per_node 4 -m jemfast.train \\",
        "    --dataset cifar10 --out <dir> && python -m jemfast.eval --checkpoint ${RUN}/last.pt | tee log",
        "FOO=1 python3 -m jemfast.tune --smoke-test; python script.py -m jemfast.train",
    ], False)
    cmds = [(line, tokens) for line, text in logical_lines(block) for tokens in simple_commands(text)]
    found = [(line, jemfast_invocation(tokens)) for line, tokens in cmds]
    assert [(line, f) for line, f in found if f] == [
        (10, ("jemfast.train", ["--dataset", "digits", "--out", DUMMY])),
        (11, ("jemfast.train", ["--dataset", "cifar10", "--out", DUMMY])),
        (11, ("jemfast.eval", ["--checkpoint", f"{DUMMY}/last.pt"])),
        (13, ("jemfast.tune", ["--smoke-test"])),
    ]


# ---- links and anchors ----------------------------------------------------------------------------
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.I)
SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//)")


def prose(path: Path) -> list[str]:
    """The file's lines with fenced blocks blanked and inline code spans removed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    code = set()
    for block in fenced_blocks(path):
        code.update(range(block.line - 2, block.line + len(block.lines)))  # fences included (0-based)
    return ["" if k in code else re.sub(r"(`+)(?:(?!\1).)+?\1", "", line) for k, line in enumerate(lines)]


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, seen = set(), {}
    for line in prose_with_code_headings(path):
        m = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    text = path.read_text(encoding="utf-8")
    out.update(re.findall(r"<a\s+(?:name|id)=[\"']([^\"']+)[\"']", text))
    return out


def prose_with_code_headings(path: Path) -> list[str]:
    """Lines outside fenced blocks, inline code kept (a heading's `code` is part of its slug)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    code = set()
    for block in fenced_blocks(path):
        code.update(range(block.line - 2, block.line + len(block.lines)))
    return ["" if k in code else line for k, line in enumerate(lines)]


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for k, line in enumerate(prose(path), start=1):
        for pattern in (LINK, REF_DEF, IMG_SRC):
            out.extend((k, m.group(1)) for m in pattern.finditer(line))
    return out


def check_link(path: Path, line: int, target: str) -> str | None:
    if SCHEME.match(target):
        return None
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    where = f"{rel(path)}:{line}: link {target}"
    if not dest.exists():
        return f"{where}: {file_part} does not exist"
    if anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
        close = difflib.get_close_matches(anchor, sorted(anchors(dest)), n=1)
        hint = f" (did you mean #{close[0]}?)" if close else ""
        return f"{where}: no heading #{anchor} in {dest.relative_to(REPO)}{hint}"
    return None


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_doc_links_resolve(path):
    found = links(path)
    problems = [p for line, target in found if (p := check_link(path, line, target))]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_link_rules():
    assert github_slug("Outputs (in `--out`)") == "outputs-in---out"
    assert github_slug("An original JEM script: `jemfast.compat`") == "an-original-jem-script-jemfastcompat"
    assert github_slug("CPU: this project's 2-core development machine (not a GPU figure)") == \
        "cpu-this-projects-2-core-development-machine-not-a-gpu-figure"
    readme = REPO / "README.md"
    assert check_link(readme, 1, "docs/nope.md")
    assert check_link(readme, 1, "docs/training.md#no-such-heading")
    assert check_link(readme, 1, "docs/training.md#training-variants") is None
    assert check_link(readme, 1, "https://example.org/x") is None
    assert any(target.endswith(".png") for _, target in links(readme)), "the README's picture is not seen"


# ---- runnable examples ------------------------------------------------------------------------------
def marked_blocks() -> list[Block]:
    return [b for path in DOCS for b in fenced_blocks(path) if b.marked]


def test_run_markers_mark_python_blocks():
    marked = marked_blocks()
    assert marked, f"no block is marked {RUN_MARKER}: the library example should be"
    bad = [f"{rel(b.path)}:{b.line}" for b in marked if b.tag != "python"]
    assert not bad, f"{RUN_MARKER} must come right before a ```python fence: {bad}"


@pytest.mark.parametrize("block", marked_blocks(), ids=lambda b: f"{rel(b.path)}:{b.line}")
def test_marked_python_blocks_run(block, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", "\n".join(block.lines)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"{rel(block.path)}:{block.line}: the example fails:\n{proc.stderr[-3000:]}"


# ---- the README's two commands ------------------------------------------------------------------------
def test_readme_test_command_is_what_ci_runs():
    bash = [b for b in fenced_blocks(REPO / "README.md") if b.tag == "bash"]
    second = "\n".join(bash[1].lines)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    install = re.search(r"^pip install (?:-q )?(.*)$", ci, re.M).group(1)
    tests = re.search(r"^(python -m pytest .*)$", ci, re.M).group(1)
    assert f"pip install {install}" in second, (install, second)
    assert tests in second, (tests, second)


def test_readme_quickstart_timing_sentence_above_first_block():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    first = fenced_blocks(REPO / "README.md")[0].line - 2  # 0-based line of the first fence
    above = [line for line in lines[:first] if line.strip()][-1]
    assert above.startswith("Install and train") and "docs/speed.md" in above, above
