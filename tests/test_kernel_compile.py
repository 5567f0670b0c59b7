"""The Triton kernels compiled for real GPUs (sm_80, sm_90, sm_100) on this CPU machine.

- every specialisation the launchers launch compiles for each target, with no spill and with
  registers and stack frame within its module's budget (``python -m jemfast.kernels.aot``, in
  a subprocess with ``TRITON_INTERPRET`` unset: conftest sets it for this process, and
  interpreted kernels cannot be compiled);
- the list of specialisations is the launchers' own: running every launcher under the
  interpreter over every dtype it accepts, every flag and both divisibility classes of its size
  argument launches exactly the listed specialisations (a new flag, dtype or kernel without an
  entry fails here);
- every ``@triton.jit`` kernel in ``kernels/`` has entries and a budget;
- the budget check itself flags spills, registers and stack frames over budget, and compile errors.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, triton_marker

pytest.importorskip("triton", reason="triton is not installed")

from jemfast.kernels import aot, buffer, sgld  # noqa: E402
from jemfast.kernels._common import interpret_mode, launch_spec, new_rng_state  # noqa: E402

DEVICE, _ = triton_marker()


def _spec_kernels() -> set[str]:
    return {s.kernel for s in aot.all_specs()}


@pytest.mark.slow  # ~10 s with Triton's cache warm, 1-2 min cold (114 compiles on 2 cores)
def test_every_specialisation_compiles_for_sm80_sm90_sm100_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, "-m", "jemfast.kernels.aot", "--json", str(out), "--jobs", "2"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    rows, specs = data["rows"], aot.all_specs()
    assert data["violations"] == []
    assert len(rows) == len(specs) * len(aot.TARGETS)
    assert {(r["spec"], r["arch"]) for r in rows} == {(s.label(), a) for s in specs for a in aot.TARGETS}
    for r in rows:
        b = aot.budgets(r["kernel"])
        assert "error" not in r, r
        assert r["spill_stores"] == r["spill_loads"] == 0, r
        assert 0 < r["regs"] <= b["regs"] and r["stack"] <= b["stack"], r
        assert r["regs"] == r["ptxas_regs"], r  # the cubin Triton built and our ptxas -v agree
        assert r["shared"] == 0  # elementwise kernels: no shared memory
    assert {r["kernel"] for r in rows} == _spec_kernels()


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records the LaunchSpec of each launch, then launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.seen = kernel, set()

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, num_warps: int = 4, **constexprs):  # 4: Triton's default
            self.seen.add(launch_spec(self.kernel, args, constexprs, num_warps))
            return launch(*args, num_warps=num_warps, **constexprs)

        return run


@pytest.mark.skipif(DEVICE.type == "cpu" and not interpret_mode(), reason="needs CUDA or the Triton interpreter")
def test_the_launchers_launch_exactly_the_listed_specialisations(monkeypatch):
    rec_sgld, rec_gather = _Recorder(sgld._sgld_kernel), _Recorder(buffer._gather_reinit_kernel)
    monkeypatch.setattr(sgld, "_sgld_kernel", rec_sgld)
    monkeypatch.setattr(buffer, "_gather_reinit_kernel", rec_gather)
    rng = new_rng_state(0, DEVICE)
    for gdt, noise, clamp, clip, n in itertools.product(sgld._GRAD_DTYPES, (0.0, 0.01), (False, True),
                                                         (None, 0.5), (48, 5)):  # n % 16 == 0 and not
        x = torch.zeros(n, device=DEVICE)
        sgld.sgld_update_(x, torch.ones(n, device=DEVICE, dtype=gdt), 0.1, noise, rng, clamp=clamp, grad_clip=clip)
    for dtype, row in itertools.product(buffer._BUFFER_DTYPES, ((4, 4), (3, 5))):
        buf = torch.zeros((6, *row), device=DEVICE, dtype=dtype)
        idx = torch.tensor([0, 5], device=DEVICE)
        buffer.gather_reinit(buf, idx, torch.tensor([True, False], device=DEVICE), rng)
    assert rec_sgld.seen == set(sgld.launch_specs())
    assert rec_gather.seen == set(buffer.launch_specs())


def test_every_jit_kernel_has_specialisations_and_a_budget():
    mods = aot.kernel_modules()
    assert {m.__name__ for m in mods} >= {"jemfast.kernels.sgld", "jemfast.kernels.buffer"}
    for mod in mods:
        kernels = aot.jit_kernels(mod)
        listed = {s.kernel for s in mod.launch_specs()}
        assert set(kernels) == listed, (mod.__name__, set(kernels) ^ listed)
        assert all(s.module == mod.__name__ for s in mod.launch_specs())
        assert mod.MAX_REGISTERS > 0 and mod.MAX_STACK >= 0
    assert _spec_kernels() == {"_sgld_kernel", "_gather_reinit_kernel"}


def test_budget_check_flags_spills_registers_stack_and_errors():
    ok = {"kernel": "_sgld_kernel", "spec": "s", "arch": 90, "regs": 32, "stack": 32, "shared": 0,
          "spill_stores": 0, "spill_loads": 0}
    assert aot.violations([ok]) == []
    bad = [{**ok, "spill_stores": 4, "spill_loads": 4}, {**ok, "regs": 48}, {**ok, "stack": 40},
           {"kernel": "_sgld_kernel", "spec": "s", "arch": 100, "error": "CompilationError: x"}]
    found = aot.violations(bad)
    assert len(found) == 4
    assert "spills 4 B" in found[0] and "48 registers > budget 40" in found[1]
    assert "40 B stack frame > budget 32" in found[2] and "compile error" in found[3]


def test_aot_refuses_to_run_under_the_interpreter():
    if not interpret_mode():
        pytest.skip("this process does not run the interpreter")
    assert aot.main(["--arch", "90"]) == 2
