"""Printing: aligned tables and JSON, the same for every listing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    print(format_table(rows, headers))
