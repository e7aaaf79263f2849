"""Human-readable tables of a run's report dict (the same dict loraprune.json holds)."""


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def format_summary(report: dict) -> str:
    """The before/after table printed at the end of `loraprune prune`."""
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    removed, config = report["removed"], report["config"]
    pruned_layers = sum(layer["pruned"] for layer in report["layers"])
    rows = [
        ("", "dense", "pruned"),
        ("parameters, total", _millions(before["total"]), _millions(after["total"])),
        ("parameters, prunable (q/k/v/o/gate/up/down)", _millions(before["prunable"]), _millions(after["prunable"])),
        ("heads removed (in pruned layers)", "", f"{removed['heads']:.1%}"),
        ("MLP channels removed (in pruned layers)", "", f"{removed['channels']:.1%}"),
        ("total parameters removed", "", f"{removed['total_parameters']:.1%}"),
    ]
    evaluation = report.get("evaluation")
    if evaluation:
        dense, pruned = evaluation["dense"], evaluation["pruned"]
        label = f"{evaluation['data']} {evaluation['split']} perplexity ({evaluation['seq_len']}-token windows)"
        rows.append((label, f"{dense['perplexity']:.2f}", f"{pruned['perplexity']:.2f}"))
        rows.append(("  tokens scored", str(dense["tokens"]), str(pruned["tokens"])))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows]
    lines.append(
        f"ratio {config['ratio']} of groups in {pruned_layers}/{len(report['layers'])} layers, "
        f"criterion {config['criterion']}, {config['steps']} steps, "
        f"{report['skipped_score_updates']} skipped score updates; "
        f"pruning {report['seconds']:.0f} s, wall time {report.get('wall_seconds', report['seconds']):.0f} s"
    )
    return "\n".join(lines)


def format_eval(result: dict) -> str:
    """The table printed by `loraprune eval`."""
    rows = [
        ("model", result["model"]),
        (
            f"{result['data']} {result['split']} perplexity ({result['seq_len']}-token windows)",
            f"{result['perplexity']:.3f}",
        ),
        ("tokens scored / windows", f"{result['tokens']} / {result['windows']}"),
        ("parameters, total", _millions(result["parameters"])),
        ("parameters, prunable", _millions(result["prunable_parameters"])),
        ("seconds", f"{result['seconds']:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
