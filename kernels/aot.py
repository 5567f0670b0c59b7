"""Ahead-of-time compile of every kernel specialisation for real GPUs, on any machine (no GPU).

Each kernel module lists the specialisations its launcher launches (``launch_specs()``, a list of
:class:`._common.LaunchSpec`); :func:`compile_all` compiles each for every target in
:data:`TARGETS` with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and
reads the resources of the binary Triton built:

- registers, stack frame and shared memory from the cubin (``cuobjdump --dump-resource-usage``);
- spill stores and loads from ``ptxas -v`` run on Triton's PTX with Triton's own ptxas options
  (the log of Triton's own ptxas run is not kept, and a cached compile has none).

:func:`violations` checks them against each module's budget (``MAX_REGISTERS``, ``MAX_STACK``)
and against zero spills. Command line (what tests/test_kernel_compile.py and bench/gpu.sh run)::

    python -m jemfast.kernels.aot [--arch 80,90,100] [--json PATH] [--jobs N]

prints the resource table (markdown), writes it as JSON, and exits 1 on a compile error or a
budget violation. It must run with ``TRITON_INTERPRET`` unset: under the interpreter the kernels
are interpreted functions, which cannot be compiled. Triton's cache makes a second run fast; the
ptxas/cuobjdump readings are cached beside it, keyed by the PTX.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ._common import HAS_TRITON, LaunchSpec, interpret_mode

TARGETS = (80, 90, 100)  # A100, H100/H200, B200


def all_specs() -> list[LaunchSpec]:
    """The specialisations of every kernel module of this package (``launch_specs()`` of each)."""
    specs = []
    for mod in kernel_modules():
        specs.extend(mod.launch_specs())
    return specs


def kernel_modules() -> list[Any]:
    """The modules of this package that define a ``@triton.jit`` kernel."""
    pkg = importlib.import_module(__package__)
    mods = [importlib.import_module(f"{__package__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    return [m for m in mods if jit_kernels(m)]


def jit_kernels(module: Any) -> dict[str, Any]:
    """The ``@triton.jit`` functions defined in ``module`` (compiled or interpreted), by name."""
    return {name: obj for name, obj in vars(module).items()
            if hasattr(obj, "arg_names") and getattr(getattr(obj, "fn", None), "__module__", None) == module.__name__}


def _tool(name: str, arch: int) -> str:
    """The ptxas (Blackwell's for sm_100 where Triton has one) or cuobjdump that Triton bundles."""
    from triton import knobs

    if name == "ptxas":
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            return get_ptxas(arch).path
        except (ImportError, TypeError):  # other Triton versions: one ptxas
            return knobs.nvidia.ptxas.path
    return knobs.nvidia.cuobjdump.path


def _readings(ptx: str, cubin: bytes, arch: int) -> dict[str, int]:
    """Registers/stack/shared of ``cubin`` and spills of ``ptx`` for ``sm_{arch}``; cached."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    gpu = sm_arch_from_capability(arch)
    ptxas = _tool("ptxas", arch)
    key = hashlib.sha256(ptx.encode() + cubin + gpu.encode() + ptxas.encode()).hexdigest()
    cache = Path(knobs.cache.dir) / "jemfast_aot" / f"{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f"{key}.{os.getpid()}"
    tmp.with_suffix(".ptx").write_text(ptx)
    tmp.with_suffix(".cubin").write_bytes(cubin)
    try:
        log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                              str(tmp.with_suffix(".ptx")), "-o", str(tmp.with_suffix(".o"))],
                             capture_output=True, text=True, check=True).stderr
        usage = subprocess.run([_tool("cuobjdump", arch), "--dump-resource-usage", str(tmp.with_suffix(".cubin"))],
                               capture_output=True, text=True, check=True).stdout
    finally:
        for suffix in (".ptx", ".cubin", ".o"):
            tmp.with_suffix(suffix).unlink(missing_ok=True)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if not spill or not regs:
        raise RuntimeError(f"could not read resources from ptxas -v / cuobjdump:\n{log}\n{usage}")
    out = {"regs": int(regs[1]), "stack": int(regs[2]), "shared": int(regs[3]), "local": int(regs[4]),
           "spill_stores": int(spill[2]), "spill_loads": int(spill[3]),
           "ptxas_regs": int(re.search(r"Used (\d+) registers", log)[1])}
    cache.write_text(json.dumps(out))
    return out


def compile_spec(spec: LaunchSpec, arch: int) -> dict[str, Any]:
    """Compile ``spec`` for ``sm_{arch}``; its row of the resource table (``error`` on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget

    row: dict[str, Any] = {"kernel": spec.kernel, "spec": spec.label(), "arch": arch}
    try:
        fn = getattr(importlib.import_module(spec.module), spec.kernel)
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible}
        src = triton.compiler.ASTSource(fn, dict(spec.signature), dict(spec.constexprs), attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
        row.update(_readings(k.asm["ptx"], k.asm["cubin"], arch))
        row["triton_shared"] = int(k.metadata.shared)
    except Exception as exc:  # a compile error is a result: reported in the table and failed on
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return row


def _compile_pair(args: tuple[LaunchSpec, int]) -> dict[str, Any]:
    return compile_spec(*args)


def compile_all(targets: tuple[int, ...] = TARGETS, jobs: int = 1) -> list[dict[str, Any]]:
    """The resource row of every (specialisation, target), in order."""
    pairs = [(s, a) for s in all_specs() for a in targets]
    if jobs <= 1:
        return [compile_spec(*p) for p in pairs]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_pair, pairs))


def budgets(kernel: str) -> dict[str, int]:
    """``{"regs": MAX_REGISTERS, "stack": MAX_STACK}`` of the module defining ``kernel``."""
    for mod in kernel_modules():
        if kernel in jit_kernels(mod):
            return {"regs": mod.MAX_REGISTERS, "stack": mod.MAX_STACK}
    raise KeyError(kernel)


def violations(rows: list[dict[str, Any]]) -> list[str]:
    """One line per compile error, spill, or register count / stack frame above budget."""
    bad = []
    for r in rows:
        where = f"{r['spec']} sm_{r['arch']}"
        if "error" in r:
            bad.append(f"{where}: compile error: {r['error']}")
            continue
        b = budgets(r["kernel"])
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{where}: spills {r['spill_stores']} B stores, {r['spill_loads']} B loads")
        if r["regs"] > b["regs"]:
            bad.append(f"{where}: {r['regs']} registers > budget {b['regs']}")
        if r["stack"] > b["stack"]:
            bad.append(f"{where}: {r['stack']} B stack frame > budget {b['stack']}")
    return bad


def table(rows: list[dict[str, Any]]) -> str:
    """The resource table as markdown, one line per specialisation, a column group per target."""
    archs = sorted({r["arch"] for r in rows})
    head = "| specialisation | " + " | ".join(f"sm_{a} regs / stack / spill" for a in archs) + " |"
    lines = [head, "|---|" + "---|" * len(archs)]
    by_spec: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_spec.setdefault(r["spec"], {})[r["arch"]] = r
    for spec, per in by_spec.items():
        cells = [("error" if "error" in per[a] else
                  f"{per[a]['regs']} / {per[a]['stack']} / {per[a]['spill_stores'] + per[a]['spill_loads']}")
                 for a in archs]
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jemfast.kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90,100")
    p.add_argument("--json", type=Path, help="write the rows and violations here")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    a = p.parse_args(argv)
    if not HAS_TRITON:
        print("jemfast.kernels.aot: triton is not installed", file=sys.stderr)
        return 2
    if interpret_mode():
        print("jemfast.kernels.aot: TRITON_INTERPRET=1 is set; the kernels are interpreted and cannot be "
              "compiled (run with TRITON_INTERPRET unset)", file=sys.stderr)
        return 2
    rows = compile_all(tuple(int(x) for x in a.arch.split(",")), a.jobs)
    bad = violations(rows)
    print(table(rows))
    import triton

    print(f"\n{len(rows)} compiles (triton {triton.__version__}); {len(bad)} violations")
    for line in bad:
        print("VIOLATION", line)
    if a.json:
        a.json.write_text(json.dumps({"triton": triton.__version__, "rows": rows, "violations": bad}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
