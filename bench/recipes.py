"""Recipes: the best pruned model inside LoRA's memory, each recipe beside the `gradient` criterion
under the same recipe, at one fine-tuning budget.

A run is `NAME=CRITERION:RATIO[:setting=value,...]` (PruneConfig settings, e.g.
`lora-kd=lora:0.5:distill=0.5,allocation=global`); ratio 0 is dense + LoRA, `none` the model as
shipped. Each run writes its own JSON into bench/results/recipes-LABEL/ and is skipped when that
file exists, so a long list resumes where it stopped; the table is built from every JSON there. With
--checkpoints DIR a run longer than one sitting continues from its newest checkpoint (DIR/NAME).
Perplexity: non-overlapping 128-token windows of each --eval-data text (by default PTB test and
valid, and `pydoc`, the Python reference as the interpreter ships it: another domain than PTB).
"""

import json
import shlex
import shutil
import time
from pathlib import Path

from loraprune import prune
from loraprune.archs import arch_for
from loraprune.pipeline.counts import count_parameters, count_prunable
from loraprune.pipeline.export import save_pruned
from loraprune.pipeline.texts import load_text
from loraprune.runtime.checkpoint import Checkpoint, Checkpointer, has_checkpoints, latest

from . import common, publish
from .recipe_runs import removed_groups, removed_iou

NAME = "recipes"
EVALS = "ptb:test,ptb:valid,pydoc:test"
CHECKPOINT_EVERY = 25  # steps a stopped run loses at most (Gemma 3 270M: about 15 s a step here)


def arguments():
    p = common.budget_arguments(common.parser(__doc__.splitlines()[0]))
    p.add_argument("--eval-data", default=EVALS, help="TEXT:SPLIT,... to measure perplexity on")
    p.add_argument("--save", help="folder to save each pruned model in (one sub-folder per run, for bench.serving)")
    every = f"a sub-folder per run, every {CHECKPOINT_EVERY} steps"
    p.add_argument(
        "--checkpoints",
        help=f"folder of each run's checkpoints ({every}): a stopped run continues; "
        "its teacher-cache/ keeps the dense model's top-k for every later run on the same windows",
    )
    p.add_argument("runs", nargs="*", help="NAME=CRITERION:RATIO[:setting=value,...] (none: rebuild the table)")
    return p


def _number(value: str) -> int | float | str:
    """A setting's value as written: integers (batch_size=1) stay integers."""
    if value.isdigit():
        return int(value)
    return float(value) if value.replace(".", "", 1).isdigit() else value


def parse_run(spec: str) -> tuple[str, str | None, float | None, dict]:
    name, _, what = spec.partition("=")
    if what == "none":
        return name, None, None, {}
    criterion, ratio, *rest = what.split(":")
    settings = {}
    for item in filter(None, ",".join(rest).split(",")):
        key, value = item.split("=")
        settings[key] = _number(value)
    return name, criterion, float(ratio), settings


def run_one(args, spec: str, base, tokenizer, evals: dict, folder: Path) -> None:
    name, criterion, ratio, settings = parse_run(spec)
    path = folder / f"{name}.json"
    if path.exists():
        print(f"[recipes] {name}: done before ({path})", flush=True)
        return
    started = time.perf_counter()
    model, report, checkpointer, resume = common.fresh(base), None, None, None
    if ratio is not None:
        config = common.budget(args, ratio, criterion, **settings)
        checkpointer, resume = checkpoints(args, name, spec)
        cache = Path(args.checkpoints) / "teacher-cache" if args.checkpoints else None
        model, report = prune(model, tokenizer, load_text(args.data, "train"), config, False, checkpointer, resume,
                              teacher_cache=cache)  # fmt: skip
        if args.save:
            save_pruned(model, tokenizer, Path(args.save) / name, report, overwrite=True)
    seconds = time.perf_counter() - started
    row = {
        "name": name,
        "spec": spec,
        "perplexity": common.perplexities(model, evals),
        "parameters": {"total": count_parameters(model), "prunable": count_prunable(model, arch_for(model.config))},
        "dense_parameters": count_parameters(base),
        "layers": None if report is None else report["layers"],
        "masks": None if report is None else packed_masks(report["scores"]),
        "config": None if report is None else report["config"],
        "prune_seconds": seconds,  # of this process alone when resumed; the steps' own time is in train_seconds
        "train_seconds": None if report is None else sum(report["history"]["step_seconds"]),
        "resumed_from_step": None if resume is None else resume.step,
        "args": vars(args),
        "machine": common.machine(),
        "command": common.command(None, "bench.recipes"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2) + "\n")
    if checkpointer is not None:  # kept through evaluation, which takes minutes on a larger model
        shutil.rmtree(checkpointer.directory, ignore_errors=True)
    print(f"[recipes] {name}: {row['perplexity']} ({seconds:.0f} s to prune)", flush=True)


def checkpoints(args, name: str, spec: str) -> tuple[Checkpointer | None, Checkpoint | None]:
    """Under --checkpoints: the run's checkpointer, and its newest checkpoint if an earlier process
    stopped part-way (an unfinished run of another spec under the same name is refused)."""
    if not args.checkpoints:
        return None, None
    directory = Path(args.checkpoints) / name
    resume = latest(directory) if has_checkpoints(directory) else None
    if resume is not None and resume.run != {"spec": spec}:
        raise SystemExit(f"bench.recipes: {directory} holds an unfinished run of {resume.run}, not {spec!r}")
    return Checkpointer(directory, {"spec": spec}, every=CHECKPOINT_EVERY, replace=resume is None), resume


def packed_masks(scores: dict) -> dict:
    """The final masks, one '0'/'1' string per layer (1: kept), for agreement between runs."""
    return {
        name: ["".join("1" if kept else "0" for kept in row) for row in scores[name].tolist()]
        for name in ("head_alive", "channel_alive")
    }


def mask_agreement(rows: list[dict]) -> str:
    """IoU of the groups (heads and channels together) that two runs removed, for every pair of runs
    that saved their masks; '' when fewer than two did."""
    removed = {r["name"]: removed_groups(r["masks"]) for r in rows if r.get("masks")}
    if len(removed) < 2:
        return ""
    names = list(removed)
    table = common.table(
        ["IoU of removed groups", *names],
        [[a, *(removed_iou(removed[a], removed[b]) for b in names)] for a in names],
    )
    return f"\n\nAgreement of the final masks (removed heads and channels, all pruned layers):\n\n{table}"


def main(argv=None, model=None, tokenizer=None) -> None:
    args = arguments().parse_args(argv)
    common.setup(args)
    folder = Path(args.results) / f"{NAME}-{args.label}"
    if args.runs:
        base, tokenizer = common.load(args, model, tokenizer)
        limit = args.eval_windows or None
        evals = {
            f"{data} {split}": common.token_windows(tokenizer, data, split, args.eval_seq, limit)
            for data, split in (item.rsplit(":", 1) for item in args.eval_data.split(","))
        }
        for spec in args.runs:
            run_one(args, spec, base, tokenizer, evals, folder)
    publish.write_page(args, NAME, f"{NAME}-{args.label}", f"7. Recipes inside LoRA's memory ({args.label})")


def run_arguments(row: dict) -> dict:
    """The arguments a run was measured with: recorded in its JSON, or read back from its command."""
    if "args" in row:
        return row["args"]
    return vars(arguments().parse_args(shlex.split(row["command"])[3:]))  # after '.venv/bin/python -m bench.recipes'


def section(payload: dict, page, results) -> str:
    """The page's section of one label: {"label", "rows"} (the runs of one folder)."""
    rows = payload["rows"]
    keys = list(dict.fromkeys(key for r in rows for key in r["perplexity"]))  # every text measured, in order
    table = common.table(
        ["run", "recipe", "steps", "shrink", *[f"ppl {k}" for k in keys], "params removed"],
        [
            [
                r["name"],
                r["spec"].partition("=")[2],
                "" if r["config"] is None else r["config"]["steps"],
                "" if r["config"] is None else r["config"].get("shrink", "end"),  # before --shrink: masked
                *[r["perplexity"].get(k) for k in keys],
                f"{1 - r['parameters']['total'] / r['dense_parameters']:.1%}",
            ]
            for r in rows
        ],
    )
    budgets = {common.budget_text(run_arguments(r)) for r in rows}
    budget = budgets.pop() if len(budgets) == 1 else "Budgets differ between rows: see each run's JSON."
    if any(r["config"] and r["config"]["steps"] != run_arguments(r)["steps"] for r in rows):
        budget += " Where a row's steps differ, its recipe set them (and the schedule scales with them)."
    commands = sorted({r["command"] for r in rows})
    return (
        f"{budget} Tuned on `{run_arguments(rows[0])['data']}`. `pydoc`: the Python reference, text from another "
        "domain. A recipe is "
        "`CRITERION:RATIO[:setting=value,...]` (PruneConfig settings); ratio 0 is dense + LoRA, `none` the model as "
        f"shipped.\n\n{table}{mask_agreement(rows)}\n\nCommands (a run already in the folder is skipped):\n\n"
        + "\n".join(f"- `{c}`" for c in commands)
    )


if __name__ == "__main__":
    main()
