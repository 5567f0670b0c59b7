"""Both install modes import every jemfast package from anywhere (slow: two venvs, two installs).

For ``pip install .`` and ``pip install -e .`` (``--no-deps --no-build-isolation --no-index``, as
on a GPU machine without a package index), each into a fresh virtual environment that sees this
environment's packages (torch, setuptools) through a ``.pth`` line, from a copy of the source
tree: every package of the tree (``jemfast`` and its subpackages, ``kernels/`` as
``jemfast.kernels``, ``tune/`` as ``jemfast.tune``) imports

- from the repository root, where the local ``jemfast/`` shadows the installed one and
  ``jemfast/__init__.py`` finds ``kernels/`` and ``tune/`` beside it, and
- from another directory, where a plain install must supply them all itself (a package missing
  from pyproject's list shows up here) and an editable one maps them to the source tree.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PROBE = """
import importlib, json, os, sys
names = json.loads(sys.argv[1])
mods = {n: importlib.import_module(n) for n in names}
assert callable(mods["jemfast.kernels"].sgld_update_)
print(json.dumps({n: os.path.realpath(os.path.dirname(m.__file__)) for n, m in mods.items()}))
"""


def _source_copy(dst: Path) -> Path:
    """The repository's tracked and untracked-but-not-ignored files, copied to ``dst``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    return dst


def _packages(src: Path) -> list[str]:
    """Import names of every package in the source tree (folders with an ``__init__.py``)."""
    names = []
    for top, name in (("jemfast", "jemfast"), ("kernels", "jemfast.kernels"), ("tune", "jemfast.tune")):
        for init in sorted((src / top).rglob("__init__.py")):
            rel = init.parent.relative_to(src / top).parts
            names.append(".".join((name, *rel)))
    return names


def _venv(path: Path) -> Path:
    """A venv without pip whose ``sys.path`` ends with this environment's site-packages
    (plain ``.pth`` path lines: this environment's own editable jemfast finder stays inactive)."""
    venv.create(path, with_pip=False, symlinks=True)
    py = path / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return py


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_every_package_imports_from_the_root_and_elsewhere(tmp_path, editable):
    src = _source_copy(tmp_path / "src")
    py = _venv(tmp_path / "venv")
    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
           "--no-build-isolation", "--no-index", *(["-e"] if editable else []), "."]
    r = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = _packages(src)
    assert {"jemfast", "jemfast.kernels", "jemfast.tune"} <= set(names)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = {}
    for cwd in (src, elsewhere):
        r = subprocess.run([py, "-c", PROBE, json.dumps(names)], cwd=cwd, capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, f"from {cwd}: {r.stderr[-3000:]}"
        where[cwd] = json.loads(r.stdout.strip().splitlines()[-1])
    real_src = os.path.realpath(src)
    # from the root: the source tree, always
    assert all(p.startswith(real_src) for p in where[src].values()), where[src]
    # from elsewhere: the source tree if editable, else the venv's own copy
    from_src = [n for n, p in where[elsewhere].items() if p.startswith(real_src)]
    assert from_src == (names if editable else []), where[elsewhere]
    assert where[elsewhere]["jemfast.kernels"].endswith("kernels")
