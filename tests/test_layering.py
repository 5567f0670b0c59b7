"""The layer picture in README "Layout and development" is the import rule of the package.

Each row of the picture lists entries (a top-level module ``name.py`` or a package ``name/``;
``kernels/`` and ``tune/`` are ``jemfast.kernels`` and ``jemfast.tune``); a module may import
modules of its own entry and of rows below its row, nothing else: no arrow up, none sideways
between entries of one row. Every import counts, those inside functions too (read with ``ast``
from the source, as ../shared/tools/import_cycles.py reads it). ``from jemfast import
__version__`` is allowed anywhere: it names a constant, and the root package runs before any of
its modules anyway. Also here: no file of jemfast/, kernels/ or tune/ is longer than MAX_LINES.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

MAX_LINES = 450
ROOTS = {"jemfast": "jemfast", "kernels": "jemfast.kernels", "tune": "jemfast.tune"}
ROOT_CONSTANTS = {"__version__"}


def readme_layers(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The rows of the picture, bottom row first; each row its entries (``train.py``, ``sgld/``)."""
    section = readme.read_text(encoding="utf-8").split("## Layout and development", 1)[1]
    block = re.search(r"\*\*Layers\.\*\*.*?```text\n(.*?)```", section, re.S)
    assert block, 'README "Layout and development" has no **Layers.** picture (a ```text block)'
    rows = []
    for line in block.group(1).splitlines():
        entries = []
        for word in line.split():
            if not re.fullmatch(r"\w+(\.py|/)", word):
                break  # the rest of the line describes the row
            entries.append(word)
        if entries:
            rows.append(entries)
    return rows[::-1]


def source_modules() -> dict[str, Path]:
    """Import name -> file of every module of jemfast/, kernels/ and tune/."""
    out = {}
    for top, prefix in ROOTS.items():
        for path in sorted((REPO / top).rglob("*.py")):
            parts = path.relative_to(REPO / top).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((prefix, *parts))] = path
    return out


def entry_of(module: str) -> str:
    """The picture's entry a module belongs to."""
    if module == "jemfast":
        return "__init__.py"
    first = module.split(".")[1]
    if first in ("kernels", "tune"):
        return f"{first}/"
    is_package = (REPO / "jemfast" / first).is_dir()
    return f"{first}/" if is_package else f"{first}.py"


def imported(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The project's modules that ``source`` (module ``module``) imports."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found = set()

    def nearest(name: str) -> str | None:
        while name and name not in known:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [nearest(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = []
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    targets.append(f"{base}.{a.name}")
                elif not (base == "jemfast" and a.name in ROOT_CONSTANTS):
                    targets.append(nearest(base))
        else:
            continue
        found.update(t for t in targets if t and t != module)
    return found


def arrows_against(layers: list[list[str]], sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import of ``sources`` (module -> (source, is_package)) that the picture forbids, as
    ``"A (row i, entry) -> B (row j, entry): why"`` lines; rows are counted from the bottom."""
    row = {entry: i for i, entries in enumerate(layers) for entry in entries}
    bad = []
    for module, (source, is_package) in sorted(sources.items()):
        mine = entry_of(module)
        for target in sorted(imported(module, source, is_package, set(sources))):
            theirs = entry_of(target)
            if theirs == mine or row[theirs] < row[mine]:
                continue
            why = "sideways, in one row" if row[theirs] == row[mine] else "up"
            bad.append(f"{module} ({mine}, row {row[mine]}) -> {target} ({theirs}, row {row[theirs]}): {why}")
    return bad


def _tree() -> dict[str, tuple[str, bool]]:
    return {m: (p.read_text(encoding="utf-8"), p.name == "__init__.py") for m, p in source_modules().items()}


def test_every_module_has_one_place_in_the_picture():
    layers = readme_layers()
    entries = [e for row in layers for e in row]
    assert len(entries) == len(set(entries)), f"an entry appears twice in the picture: {entries}"
    used = {entry_of(m) for m in source_modules()}
    assert not used - set(entries), f"README's layer picture lacks {sorted(used - set(entries))}"
    assert not set(entries) - used, f"README's layer picture names what is not there: {sorted(set(entries) - used)}"


def test_every_import_points_down_the_picture():
    bad = arrows_against(readme_layers(), _tree())
    assert not bad, "imports against README's layer picture:\n" + "\n".join(bad)


def test_an_arrow_up_or_sideways_is_named():
    tree = _tree()
    tree["jemfast.stability.monitor"] = ("from ..train import train\nfrom .. import __version__\n", False)
    tree["jemfast.step"] = ("def f():\n    from .build import seed_all\n", False)
    tree["jemfast.rundir.checkpoint"] = ("import jemfast.distributed.ranks\n", False)
    tree["jemfast.outputs.plots"] = ("from ..distributed import ranks\n", False)  # down: allowed
    bad = arrows_against(readme_layers(), tree)
    assert [b for b in bad if b.startswith(("jemfast.stability.monitor ", "jemfast.step ", "jemfast.rundir.checkpoint ",
                                            "jemfast.outputs.plots "))] == [
        "jemfast.rundir.checkpoint (rundir/, row 7) -> jemfast.distributed.ranks (distributed/, row 8): up",
        "jemfast.stability.monitor (stability/, row 6) -> jemfast.train (train.py, row 11): up",
        "jemfast.step (step.py, row 5) -> jemfast.build (build.py, row 5): sideways, in one row",
    ]


def test_no_file_is_longer_than_the_limit():
    long = [f"{p.relative_to(REPO)}: {n} lines" for p in source_modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines (split them by what they hold): {long}"
