"""Reading the recipes benchmark's results back: the runs of one label (bench/results/recipes-<label>/,
a JSON per run) and the groups a run's final masks removed, for the page and for claims about
agreement between runs."""

import json
from pathlib import Path


def runs_of(folder: Path) -> list[dict]:
    """Every run measured under one label (a folder of JSON, one per run), in the order they ran."""
    return sorted((json.loads(p.read_text()) for p in folder.glob("*.json")), key=lambda r: r["machine"]["date"])


def removed_groups(masks: dict) -> set[tuple[str, int, int]]:
    return {(name, i, j) for name, layers in masks.items() for i, row in enumerate(layers) for j, bit in enumerate(row)
            if bit == "0"}  # fmt: skip


def removed_iou(a: set, b: set) -> float:
    """|removed by both| / |removed by either| (1 when neither removed anything)."""
    return len(a & b) / max(1, len(a | b))
