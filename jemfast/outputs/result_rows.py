"""The benchmarks' ``results.jsonl``: one JSON object per finished run, appended as runs finish;
their reports (table.md and a picture) are written again from all of it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..process.errors import UserError


def read_result_rows(results: Path, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Every row of ``results`` in file order (blank lines skipped). A missing file is ``[]`` with
    ``missing_ok``, else one clear line; so is a line that is not a JSON object."""
    if not results.is_file():
        if missing_ok:
            return []
        raise UserError(f"{results}: no such file (run the benchmark into --out first)")
    rows = []
    for n, line in enumerate(results.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{results}:{n} is not a result row ({e}); move it away") from None
        if not isinstance(row, dict):
            raise UserError(f"{results}:{n} is not a result row (not a JSON object); move it away")
        rows.append(row)
    return rows
