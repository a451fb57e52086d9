"""Helpers the commands share: list options and small tables."""

from __future__ import annotations

import argparse


def _csv(allowed: tuple[str, ...], name: str):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{name}: {', '.join(bad) or 'nothing'} not allowed; choose from {', '.join(allowed)}"
            )
        return items

    return parse


def _tokens(text: str) -> int | None:
    return None if text == "all" else int(text)


def format_table(rows: list[dict]) -> str:
    columns = ["activation", "kind", "regime", "fvu", "mmcs", "hungarian_cos", "firing_f1", "l0", "dead_fraction"]
    cells = [[f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
