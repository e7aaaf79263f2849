"""Human-readable views of a run: tables of its report dict (the dict loraprune.json holds),
and report.md with plots in the run folder."""

import json
from pathlib import Path

from ..errors import LoraPruneError
from ..pipeline.export import REPORT_FILE, SCORES_FILE


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats to 3 significant digits, None as an empty cell."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


# the summary's rows of what depth and hidden-size pruning removed, when they did
SHAPE_ROWS = (("layers", "layers removed whole (of the pruned ones)"), ("hidden", "hidden size removed"))


def _removed_by_kind(report: dict) -> list[tuple[str, str, str]]:
    """Rows of where the parameters went, when more than heads and channels went."""
    kinds = report.get("removed_parameters") or {}
    if not (kinds.get("layers") or kinds.get("hidden")):
        return []
    return [(f"  by {kind.replace('_', ' ')}", "", _millions(n)) for kind, n in kinds.items() if n]


def _pruned(layer: dict) -> str:
    if layer.get("removed"):
        return "removed"
    return "yes" if layer["pruned"] else "no"


def format_summary(report: dict) -> str:
    """The before/after table printed at the end of `loraprune prune`."""
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    removed, config = report["removed"], report["config"]
    pruned_layers = sum(layer["pruned"] for layer in report["layers"])
    rows = [
        ("", "dense", "pruned"),
        ("parameters, total", _millions(before["total"]), _millions(after["total"])),
        ("parameters, prunable (q/k/v/o/gate/up/down)", _millions(before["prunable"]), _millions(after["prunable"])),
        *[(what, "", f"{removed[key]:.1%}") for key, what in SHAPE_ROWS if removed.get(key)],
        ("heads removed (in pruned layers)", "", f"{removed['heads']:.1%}"),
        ("MLP channels removed (in pruned layers)", "", f"{removed['channels']:.1%}"),
        ("total parameters removed", "", f"{removed['total_parameters']:.1%}"),
        *_removed_by_kind(report),
    ]
    evaluation = report.get("evaluation")
    if evaluation:
        rows += _metric_rows(evaluation, evaluation["dense"], evaluation["pruned"])
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows]
    lines.append(
        f"ratio {config['ratio']} of groups in {pruned_layers}/{len(report['layers'])} layers, "
        f"criterion {config['criterion']}, {config['steps']} steps on {report.get('data')}, {_objective(config)}, "
        f"{report['skipped_score_updates']} skipped score updates, shrink {config.get('shrink') or 'end'}; "
        f"pruning {report['seconds']:.0f} s, wall time {report.get('wall_seconds', report['seconds']):.0f} s"
    )
    if evaluation and "ratio" in evaluation:
        lines += ["", texts_table(evaluation)]
    return "\n".join(lines)


def _objective(config: dict) -> str:
    """What the LoRA steps minimised: the task loss, or distillation from the dense model mixed with it."""
    if not config.get("distill"):
        return "task loss alone"
    teacher = f"top {config['distill_top_k']}" if config.get("distill_top_k") else "whole logits"
    return f"distilled {config['distill']:g} from the dense model's {teacher}"


def texts_table(evaluation: dict) -> str:
    """Each evaluated text's metric for the dense and the pruned model and their ratio: --data's test
    split first, then --eval-data's, the texts the run tuned on marked."""
    from ..pipeline.data import window_protocol
    from ..tasks import TASKS

    key = TASKS[evaluation["task"]].ratio_key
    texts = [evaluation, *evaluation.get("other_texts", [])]
    bos = any(text["dense"].get("bos") for text in texts)
    rows = [(f"{key}, {window_protocol(evaluation.get('seq_len'), bos)}", "dense", "pruned", "pruned/dense")]
    for text in texts:
        label = f"{text['data']} {text['split']}" + (" (tuned on its train split)" if text.get("tuned_on") else "")
        rows.append((label, f"{text['dense'][key]:.2f}", f"{text['pruned'][key]:.2f}", f"{text['ratio']:.2f}"))
    width = max(len(row[0]) for row in rows)
    return "\n".join(f"{a:<{width}}  {b:>10}  {c:>10}  {d:>12}" for a, b, c, d in rows)


def format_eval(result: dict) -> str:
    """The table printed by `loraprune eval`."""
    rows = [("model", result["model"])]
    if result.get("reference"):
        rows.append(("compared with (dense reference)", result["reference"]))
    for text in (result, *result.get("other_texts", [])):
        rows += [row[:2] for row in _metric_rows(result | text, text)]
    rows += [
        ("parameters, total", _millions(result["parameters"])),
        ("parameters, prunable", _millions(result["prunable_parameters"])),
        ("seconds", f"{result['seconds']:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    table = "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
    return table + "\n\n" + texts_table(result) if "ratio" in result else table


def _metric_rows(evaluation: dict, *results: dict) -> list[tuple[str, ...]]:
    """The task's metric rows of `results`, under the task's heading if it has one (tasks/)."""
    from ..pipeline.data import window_protocol
    from ..tasks import TASKS, metric_rows

    task = TASKS[evaluation.get("task", "causal-lm")]  # runs saved before the task was recorded: causal LMs
    fields = {"task": task.name, "data": evaluation["data"], "split": evaluation["split"]}
    fields["seq_len"] = evaluation.get("seq_len")
    fields["windows"] = window_protocol(fields["seq_len"], any(r.get("bos") for r in results if r))
    rows = metric_rows(task.name, *results, fields=fields)
    if task.heading is None:
        return rows
    return [(task.heading.format(**fields), *("" for _ in results)), *((f"  {r[0]}", *r[1:]) for r in rows)]


def _step_times(history: dict) -> list[str]:
    """A line on the step time and model size before the first and after the last pruning step."""
    seconds, parameters, pruning = history.get("step_seconds"), history.get("parameters"), history["pruning_steps"]
    if not seconds or not parameters or not pruning:
        return []
    first, last = pruning[0], pruning[-1]
    before = [(t, n) for step, (t, n) in enumerate(zip(seconds, parameters, strict=True), 1) if step < first]
    after = [(t, n) for step, (t, n) in enumerate(zip(seconds, parameters, strict=True), 1) if step > last]
    if not before or not after:
        return []

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return [
        f"Step time (median, pruning and shrinking included): {median([t for t, _ in before]):.3g} s before the "
        f"first pruning step ({before[0][1] / 1e6:.2f}M parameters), {median([t for t, _ in after]):.3g} s after "
        f"the last ({after[-1][1] / 1e6:.2f}M parameters).\n"
    ]


def write_report(run_dir: Path) -> Path:
    """(Re)build report.md and its PNG plots in a run folder from loraprune.json and the scores."""
    from safetensors.torch import load_file

    from .plots import plot_kept, plot_scores, plot_training

    run_dir = Path(run_dir)
    report_path = run_dir / REPORT_FILE
    if not report_path.is_file():
        raise LoraPruneError(f"{run_dir} is not a loraprune run: it has no {REPORT_FILE}")
    report = json.loads(report_path.read_text())
    dense = report["dense_groups"]
    plot_training(report["history"], run_dir / "training.png")
    plot_kept(report["layers"], dense["heads"], dense["channels"], run_dir / "kept.png")
    sections = [
        "# loraprune run\n",
        f"Model `{report.get('model', '?')}`, data `{report.get('data', '?')}`.\n",
        "```\n" + format_summary(report) + "\n```\n",
        "## Schedule and loss\n\n![loss and sparsity](training.png)\n",
        *_step_times(report["history"]),
        "## Kept groups per layer\n\n![kept groups](kept.png)\n",
    ]
    scores_path = run_dir / SCORES_FILE
    if scores_path.is_file():
        scores = load_file(str(scores_path))
        prunable = [layer["index"] for layer in report["layers"] if layer["pruned"]]
        plot_scores(scores, prunable, run_dir / "scores.png")
        sections.append("## Final group scores\n\n![score distributions](scores.png)\n")
    rows = "\n".join(
        f"| {layer['index']} | {_pruned(layer)} | {layer['heads']} | {layer['kv_heads']} | {layer['channels']} |"
        for layer in report["layers"]
    )
    sections.append(
        "## Layers\n\n| layer | pruned | heads | k/v heads | channels |\n|---|---|---|---|---|\n" + rows + "\n"
    )
    settings = "\n".join(f"| `{key}` | {value} |" for key, value in report["config"].items())
    sections.append("## Settings\n\n| setting | value |\n|---|---|\n" + settings + "\n")
    path = run_dir / "report.md"
    path.write_text("\n".join(sections))
    return path
