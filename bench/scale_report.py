"""The scale benchmark's tables and plot, from every bench/results/scale-<size>.json present."""

import json
from pathlib import Path

from . import common
from .shapes import SHAPES, model_config

GiB = 2**30
CRITERIA = ("lora", "sketch", "streamed", "gradient")
TITLE = "2b. Memory and time at 0.36B-7B shapes (bf16, CPU): lora vs sketch vs gradient"
CAPTION = "peak memory against parameters per criterion"


def load_rows(results: Path) -> tuple[list[dict], list[dict]]:
    """(rows, payloads) of all scale-*.json in `results`, smallest model first."""
    return rows_of([json.loads(p.read_text()) for p in sorted(results.glob("scale-*.json"))])


def rows_of(payloads: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows, payloads) of the given sizes' JSON, smallest model first."""
    payloads = sorted(payloads, key=lambda p: p["counts"]["parameters"])
    rows = [dict(r, parameters=p["counts"]["parameters"]) for p in payloads for r in p["rows"]]
    return rows, payloads


def cell(row: dict | None) -> str:
    if row is None:
        return ""
    if not row.get("fits", True):
        return f"does not fit (est. {row['estimate_bytes'] / GiB:.1f})"
    if "peak_bytes" not in row:
        why = "stopped for time" if "exit -15" in row.get("failed", "") else "failed"
        return f"{why} (est. {row['estimate_bytes'] / GiB:.1f})"
    return f"{row['peak_bytes'] / GiB:.2f} ({row['estimate_bytes'] / GiB:.2f})"


def error(row: dict) -> float | None:
    if "peak_bytes" not in row:
        return None
    return row["estimate_bytes"] / row["peak_bytes"] - 1


def ratio(a: dict | None, b: dict | None) -> str:
    if a and b and "peak_bytes" in a and "peak_bytes" in b:
        return f"{a['peak_bytes'] / b['peak_bytes']:.2f}"
    if a and b and "peak_bytes" in a and not b.get("fits", True):
        return f"< {a['peak_bytes'] / b['estimate_bytes']:.2f} (gradient does not fit; vs its estimate)"
    return ""


def tables(rows: list[dict]) -> tuple[str, str, dict]:
    """(memory table, time table, numbers for the claims), a column per criterion measured."""
    keyed = {(r["size"], r["point"], r["criterion"]): r for r in rows}
    criteria = [c for c in CRITERIA if any(r["criterion"] == c for r in rows)]
    order = []
    for r in rows:
        if (r["size"], r["point"]) not in order:
            order.append((r["size"], r["point"]))
    order.sort(key=lambda sp: (keyed_params(rows, sp[0]), sp[1].split(":")[0].split("x")[1].zfill(5), sp[1]))
    memory, time = [], []
    for size, point in order:
        at = {c: keyed.get((size, point, c)) for c in criteria}
        first = next(r for r in at.values() if r)
        b, s, ckpt = first["batch"], first["seq_len"], "on" if first["checkpointing"] else "off"
        params = f"{first['parameters'] / 1e9:.2f}B"
        memory.append(
            [
                size,
                params,
                f"{b}x{s}",
                ckpt,
                *(cell(at[c]) for c in criteria),
                ratio(at.get("lora"), at.get("gradient")),
            ]
        )
        steps = [f"{at[c]['median_step_s']:.1f}" if at[c] and "median_step_s" in at[c] else "" for c in criteria]
        shares = [f"{at[c]['score_share']:.1%}" if at[c] and "score_share" in at[c] else "" for c in criteria]
        if any(steps):
            time.append([size, params, f"{b}x{s}", ckpt, *steps, *shares])
    measured = [r for r in rows if "peak_bytes" in r]
    errors = [(abs(error(r)), r) for r in measured]
    numbers = {"max_estimate_error": max(errors, key=lambda e: e[0]) if errors else None}
    mem_table = common.table(
        ["model", "parameters", "batch", "grad. ckpt", *[f"{c} GiB (est.)" for c in criteria], "peak lora / gradient"],
        memory,
    )
    time_table = common.table(
        ["model", "parameters", "batch", "grad. ckpt", *[f"step s {c}" for c in criteria],
         *[f"scoring share {c}" for c in criteria]],
        time,
    )  # fmt: skip
    return mem_table, time_table, numbers


def keyed_params(rows: list[dict], size: str) -> int:
    return next(r["parameters"] for r in rows if r["size"] == size)


def plot(args, rows: list[dict], payloads: list[dict]) -> Path:
    """Peak memory against parameters, one colour per criterion: measured points and the estimate's
    lines, at 1x128 and 1x512, checkpointing off (solid) and on (dashed); returns the PNG's path."""
    from loraprune.tools.estimate import estimate

    plt = common.pyplot()
    colours = {"lora": "tab:green", "sketch": "tab:blue", "streamed": "tab:purple", "gradient": "tab:red"}
    seqs = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(seqs), figsize=(6 * len(seqs), 4.6), sharey=True, squeeze=False)
    sizes = [p["size"] for p in payloads]
    params = [p["counts"]["parameters"] / 1e9 for p in payloads]
    dtype = payloads[0]["args"]["dtype"]
    total = None
    try:
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1]) * 1024 / GiB
    except OSError:
        pass
    for ax, seq in zip(axes[0], seqs, strict=True):
        for ckpt, style in ((False, "-"), (True, "--")):
            for c in CRITERIA:
                line = [estimate(model_config(s), 1, seq, dtype=dtype, criterion=c, gradient_checkpointing=ckpt).peak
                        / GiB for s in sizes if s in SHAPES]  # fmt: skip
                ax.plot(params, line, style, color=colours[c], alpha=0.6,
                        label=f"{c} estimate, ckpt {'on' if ckpt else 'off'}")  # fmt: skip
                pts = [r for r in rows if r["criterion"] == c and r["seq_len"] == seq and r["checkpointing"] == ckpt]
                done = [r for r in pts if "peak_bytes" in r]
                ax.plot([r["parameters"] / 1e9 for r in done], [r["peak_bytes"] / GiB for r in done],
                        "o" if not ckpt else "s", color=colours[c], fillstyle="full" if not ckpt else "none",
                        linestyle="none")  # fmt: skip
        if total:
            ax.axhline(total, color="grey", linewidth=0.8)
            ax.text(params[0], total * 1.02, f"RAM of this machine ({total:.0f} GiB)", color="grey", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("parameters (billions)")
        ax.set_title(f"batch 1 x {seq}, {dtype}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("peak memory (GiB): points measured RSS, lines estimate")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    path, _ = common.save_figure(args, "scale", fig, CAPTION)
    return path


def section(payload: dict, page, results: Path) -> str:
    """The page's section of one label: {"label", "payloads": one JSON per size, "folder"}."""
    rows, payloads = rows_of(payload["payloads"])
    mem_table, time_table, numbers = tables(rows)
    err = numbers["max_estimate_error"]
    worst = f"{err[0]:.1%} ({err[1]['size']} {err[1]['criterion']} {err[1]['point']})" if err else "none measured"
    first = payloads[0]["args"]
    commands = "\n".join(f"- {p['size']}: `{p['command']}`" for p in payloads)
    figure = payload["folder"] / f"scale-{payload['label']}.png"
    return (
        f"Random weights in {first['dtype']}, built from each model's published configuration (bench/scale.py); "
        "every size and criterion in a fresh process, which measures its points in the order of the table; "
        f"{first['steps']} LoRAPrune step(s) per point (forward, backward, score update, AdamW step), LoRA r=8 on "
        "all 7 projections, the AdamW state created before measuring. Peak: the process's RSS high-water mark "
        "(reset before each point), GiB; in brackets what `loraprune estimate` (the pre-flight) expected. 'does "
        "not fit': the pre-flight refused the point (its estimate was above the memory available), so it did not "
        f"run. Largest estimate error over the measured points: {worst}.\n\n"
        f"{mem_table}\n\nStep time (median of the measured steps, seconds) and the share of it spent in the "
        f"score update, measured in the same steps:\n\n{time_table}"
        + (f"\n\n{common.image(figure, CAPTION, page)}" if figure.exists() else "")
        + f"\n\nOne process per size and criterion, as run:\n\n{commands}"
    )
