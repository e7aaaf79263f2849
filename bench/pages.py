"""The benchmark pages (docs/benchmarks/<page>.md) and the table of claims (BENCHMARKS.md), built from
the JSON in bench/results/ alone: `python -m bench.pages` rebuilds every one of them without running
anything (`--check`: report the files that differ and exit 1, writing nothing).

A page is the question it answers, its method (the benchmark script's docstring), and a section per
current result, which the script's `section(payload, page, results)` renders from the JSON. The JSON
carries the provenance (commit, date, CPU, threads, load); the pages and the claims carry none. A
result whose numbers the code no longer produces is listed in STALE with the reason: it stays in
bench/results as the record, and no page or claim shows it until it is rerun.
"""

import argparse
import hashlib
import importlib
import inspect
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import common, scale_report
from .recipe_runs import removed_groups, removed_iou, runs_of

CLAIMS_FILE = common.ROOT / "BENCHMARKS.md"

# result (relative to bench/results) -> (first 12 hex digits of the SHA-256 of the file that was judged,
# why its numbers no longer describe the code). A rerun writes other contents, which are shown again.
TRAINING_CHANGED = (
    "trained before the chunked loss and --shrink progressive (the default) changed every trained model: "
    "the same run gives other perplexities now"
)
STALE = {
    "quality-full.json": ("e58a98ec7351", TRAINING_CHANGED),
    "quality-medium.json": ("9111ded9eb9e", TRAINING_CHANGED),
    "quality-medium-seed1.json": ("b046079190ee", TRAINING_CHANGED),
    "quality-medium-seed2.json": ("00746791037e", TRAINING_CHANGED),
    "quality-medium-sketch.json": ("7f23e182dcc0", TRAINING_CHANGED),
    "masks-full.json": ("5b758748f8c9", TRAINING_CHANGED),
    "masks-medium.json": ("e7e69d34a7c6", TRAINING_CHANGED),
    "masks-medium-sketch.json": ("9c8935d7253f", TRAINING_CHANGED),
    "ema-medium.json": ("11d671f8e951", TRAINING_CHANGED),
    "schedules-medium.json": ("9fe5ddeffa26", TRAINING_CHANGED),
    "recovery-medium.json": ("d54b01fa8c37", TRAINING_CHANGED),
    "diagnose-smollm2/diagnose.json": ("62a22bf24ea3", TRAINING_CHANGED),
    "recipes-budget240/lora50.json": ("4011322a7c6d", "trained before the chunked loss"),
    "recipes-medium/lora-global.json": ("d848c99eed56", TRAINING_CHANGED),
    "recipes-medium/lora-layer.json": ("b78ed92ede74", TRAINING_CHANGED),
    "recipes-medium/lora-global-kd.json": ("5155f1819164", TRAINING_CHANGED),
    "recipes-medium/gradient-layer.json": ("d3aea88dd4fe", TRAINING_CHANGED),
    "recipes-medium/dense-lora.json": ("5de8ccbb1d9b", TRAINING_CHANGED),
    "recipes-medium/lora20.json": ("438b281df106", TRAINING_CHANGED),
    "recipes-medium/lora20-kd.json": ("ae9f37af6d58", TRAINING_CHANGED),
    "recipes-medium/lora20-kd9.json": ("0d892689f014", TRAINING_CHANGED),
    "recipes-medium/lora-kd.json": ("02eacf148d3b", TRAINING_CHANGED),
    "memory-full.json": ("97e9c88d8eff", "measured transformers' whole-logits loss, which the chunked loss replaced"),
    "memory-quick.json": ("7386e99a7539", "measured transformers' whole-logits loss, which the chunked loss replaced"),
    "overhead-full.json": ("77e6571a886e", "before the score update's reused buffers and the chunked loss"),
    "overhead-quick.json": ("121aa2a0951c", "before the score update's reused buffers and the chunked loss"),
    "overhead-quick-sketch.json": ("c915eda7e752", "before the score update's reused buffers and the chunked loss"),
    "speed-full.json": (
        "23b4b9efbfb9",
        "the pruned models' forward (modeling_pruned.py, shrink.py) changed since, "
        "and so did the criterion that picks their shapes (the default is streamed now)",
    ),  # fmt: skip
    "speed-quick.json": (
        "63cf734c8f19",
        "the pruned models' forward (modeling_pruned.py, shrink.py) changed since, "
        "and so did the criterion that picks their shapes (the default is streamed now)",
    ),  # fmt: skip
}


def fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def is_current(path: Path, results: Path) -> bool:
    """Whether the result at `path` describes the code (not the very file STALE lists)."""
    stale = STALE.get(path.relative_to(results).as_posix())
    return stale is None or fingerprint(path) != stale[0]


@dataclass(frozen=True)
class Result:
    """One section of a page: a label, the JSON (or the group of JSON) it shows, and its files."""

    label: str
    payload: dict
    files: list[Path]
    command: str | None = None  # one run's command (a section of several runs lists their own)


# a finder: (results folder, which files to keep) -> the sections of a page
Finder = Callable[[Path, Callable[[Path], bool]], list[Result]]


def one_per_file(name: str) -> Finder:
    """Results stored as <name>-<label>.json, one section each."""

    def find(results: Path, keep: Callable[[Path], bool]) -> list[Result]:
        found = []
        for path in sorted(results.glob(f"{name}-*.json")):
            if keep(path):
                payload = json.loads(path.read_text())
                found.append(Result(path.stem.removeprefix(f"{name}-"), payload, [path], payload.get("command")))
        return found

    return find


def recipe_folders(results: Path, keep: Callable[[Path], bool]) -> list[Result]:
    """bench/results/recipes-<label>/: a JSON per run, a section per label."""
    found = []
    for folder in sorted(p for p in results.glob("recipes-*") if p.is_dir()):
        files = [p for p in sorted(folder.glob("*.json")) if keep(p)]
        if files:
            rows = [r for r in runs_of(folder) if any(r["name"] == f.stem for f in files)]
            found.append(Result(folder.name.removeprefix("recipes-"), {"rows": rows}, files))
    return found


def scale_groups(results: Path, keep: Callable[[Path], bool]) -> list[Result]:
    """bench/results/scale-<size>.json (label cpu) and any folder of them (--results elsewhere)."""
    found = []
    for folder in [results, *sorted(p for p in results.glob("scale-*") if p.is_dir())]:
        files = [p for p in sorted(folder.glob("scale-*.json")) if keep(p)]
        payloads = [json.loads(p.read_text()) for p in files]
        for label in dict.fromkeys(p["label"] for p in payloads):
            mine = [(f, p) for f, p in zip(files, payloads, strict=True) if p["label"] == label]
            payload = {"label": label, "payloads": [p for _, p in mine], "folder": folder}
            found.append(Result(label, payload, [f for f, _ in mine]))
    return found


def diagnose_folders(results: Path, keep: Callable[[Path], bool]) -> list[Result]:
    found = []
    for path in sorted(results.glob("diagnose-*/diagnose.json")):
        if keep(path):
            found.append(Result(path.parent.name.removeprefix("diagnose-"), json.loads(path.read_text()), [path]))
    return found


def diagnose_section(payload: dict, page: Path, results: Path) -> str:
    from loraprune.tools.diagnose import format_diagnosis

    return f"Model `{payload['model']}`, data `{payload['data']}`.\n\n{format_diagnosis(payload)}"


def llamacpp_section(payload: dict, page: Path, results: Path) -> str:
    """llama.cpp against transformers on the same GGUF files (scripts/llamacpp_check.py)."""
    models = payload["models"]
    if any("logits_max_abs_diff" in m for m in models.values()):
        rows = [
            [name, m["gguf_architecture"], f"{m['parameters'] / 1e6:.2f}M", m["tokens_match_transformers"],
             f"{m['logits_max_abs_diff']:.2g}", f"{m['logits_max_abs_diff_relative']:.2g}",
             f"{m['logits_max_abs_diff_llamacpp_defaults']:.2g}", m["greedy_tokens_equal"]]
            for name, m in models.items()
        ]  # fmt: skip
        return (
            f"Prompt {payload['prompt']!r}, {payload['outtype']} GGUF, {payload['threads']} threads. Logits at every "
            "prompt position, with a float32 KV cache and no flash attention (so that the comparison checks the "
            "file, not llama.cpp's float16 rounding), and with llama.cpp's defaults.\n\n"
            + common.table(
                [
                    "model",
                    "GGUF architecture",
                    "parameters",
                    "tokens equal",
                    "max |logit difference|",
                    "of the largest logit",
                    "with llama.cpp defaults",
                    "greedy tokens equal",
                ],
                rows,
            )  # fmt: skip
        )
    rows = []
    for name, m in models.items():
        t = m["cpu_time_1_thread"]
        rows.append([name, t["pp_tokens_per_cpu_s_best"], t["tg_tokens_per_cpu_s_best"]])
    first = next(iter(models.values()))["cpu_time_1_thread"]
    return (
        f"llama.cpp at 1 thread, tokens per second of CPU time (which other work on the machine distorts far less "
        f"than wall time), best of the runs: {first['prompt_tokens']} prompt tokens, {first['generated_tokens']} "
        "generated. Models: dense SmolLM2; 20% and 50% per layer (`pl`, llama.cpp's deci architecture) and "
        "`--uniform` (`u`).\n\n" + common.table(["model", "prompt tokens / CPU s", "generated tokens / CPU s"], rows)
    )


DIAGNOSE = """`loraprune diagnose` fine-tunes LoRA as `prune` does, without pruning, and at chosen steps compares
the LoRA gradient estimate G_B·A + B·G_A − G_B·G_A with the true dL/dW0 on fixed probe batches (dropout
off; the true gradient is computed for the comparison only, a few layers per backward pass so that it
fits): per module, their cosine and relative error; per layer, the Spearman correlation of the `lora`
and the `gradient` group scores and the overlap of their lowest 10%, 25% and 50% of groups, beside the
Spearman correlation of `magnitude` (no gradient at all) and of one draw of `sketch`. Why an estimate
that matches poorly element by element can still rank groups well: [the method](../method.md#lora-guided-criterion)."""
LLAMACPP = """`make llamacpp-check` builds llama.cpp from the source in the llama-cpp-python sdist (once), prunes
SmolLM2 for 10 steps per layer and with `--uniform`, exports each model and the dense one to GGUF, and
compares llama.cpp's tokens, its logits at every prompt position and its greedy text with transformers'
(`scripts/llamacpp_check.py`; the logits come through libllama, `scripts/llamacpp/logits.cpp`).
`make llamacpp-bench` adds 20% models and llama.cpp's speed. Which file loads where: [serving](../serving.md)."""


@dataclass(frozen=True)
class Page:
    title: str  # the question the page answers
    module: str  # the bench script: its docstring is the method, its `section` renders a result
    make: str  # how to produce a measurement
    find: Finder | None = None  # default: <page name>-<label>.json
    render: Callable[[dict, Path, Path], str] | None = None  # default: the module's `section`
    method: str | None = None  # default: the module's docstring


PAGES = {
    "recipes": Page("How good is the pruned model, by criterion, budget and recipe?", "bench.recipes",
                    "`python -m bench.recipes --label L NAME=CRITERION:RATIO[:setting=value,...] ...`",
                    find=recipe_folders),
    "quality": Page("How does each criterion compare at an equal budget?", "bench.quality",
                    "`make bench` (the full budget) or `python -m bench.quality`"),
    "memory": Page("How much memory does a pruning step take, by criterion?", "bench.memory",
                   "`make bench` or `python -m bench.memory`"),
    "scale": Page("Does the memory claim hold at 0.36B-7B shapes?", "bench.scale", "`make bench-scale`",
                  find=scale_groups, render=scale_report.section),
    "score_blocks": Page("What does walking a projection in blocks cost in the score update?", "bench.score_blocks",
                         "`python -m bench.score_blocks`"),
    "overhead": Page("How much slower is a pruning step than a plain LoRA step?", "bench.overhead",
                     "`make bench` or `python -m bench.overhead`"),
    "progressive": Page("Does shrinking the model while it trains save time and memory?", "bench.progressive",
                        "`make bench` or `python -m bench.progressive`"),
    "speed": Page("How much faster is the pruned model?", "bench.speed", "`make bench` or `python -m bench.speed`"),
    "masks": Page("Do the criteria remove the same groups?", "bench.masks", "`make bench` or `python -m bench.masks`"),
    "diagnose": Page("How close is the LoRA gradient estimate to the true gradient?", "loraprune.tools.diagnose",
                     "`make bench-questions` (its first step, `loraprune diagnose`)", find=diagnose_folders,
                     render=diagnose_section, method=DIAGNOSE),
    "ema": Page("How much does the moving average of the scores matter?", "bench.ema",
                "`make bench-questions` or `python -m bench.ema`"),
    "schedules": Page("Which sparsity schedule works best?", "bench.schedules",
                      "`make bench-questions` or `python -m bench.schedules`"),
    "recovery": Page("Can a pruned model be fine-tuned again with a fresh LoRA?", "bench.recovery",
                     "`make bench-questions` or `python -m bench.recovery`"),
    "gpu_scale": Page("What does the paper's LLaMA-7B setting measure on a GPU?", "bench.gpu_scale",
                      "`python -m bench.gpu_scale --label NAME` on a machine with a GPU"),
    "llamacpp": Page("Does llama.cpp run the GGUF export as transformers runs the model?", "bench.pages",
                     "`make llamacpp-check` and `make llamacpp-bench`", render=llamacpp_section,
                     method=LLAMACPP),
    "serving": Page("How fast is the pruned model in llama.cpp, and what does quantizing it cost?", "bench.serving",
                    "`make llamacpp-serving`"),
}  # fmt: skip


def method_of(page: Page) -> str:
    if page.method is not None:
        return page.method
    return inspect.cleandoc(importlib.import_module(page.module).__doc__ or "")


def results_of(name: str, results: Path, stale_too: bool = False) -> list[Result]:
    """The sections of page `name`: its current results (and the stale ones too if `stale_too`)."""
    page = PAGES[name]
    return (page.find or one_per_file(name))(results, lambda path: stale_too or is_current(path, results))


def link(path: Path, page: Path) -> str:
    return f"[`{path.name}`]({Path(os.path.relpath(path.resolve(), page.resolve().parent)).as_posix()})"


def body(name: str, results: Path, page: Path) -> str:
    """The page `name` without its title, for a page file at `page`, from the results in `results`."""
    spec = PAGES[name]
    render = spec.render or importlib.import_module(spec.module).section
    parts = [method_of(spec)]
    found = results_of(name, results)
    if not found and results_of(name, results, stale_too=True):
        parts.append(f"No current measurement: the last one measured code that has changed since. {spec.make} "
                     "measures it again.")  # fmt: skip
    elif not found:
        parts.append(f"Not measured yet: {spec.make} measures it.")
    for result in found:
        run = f"; command: `{result.command}`" if result.command else ""
        files = ", ".join(link(f, page) for f in result.files)
        parts.append(f"## {result.label}\n\n{render(result.payload, page, results)}\n\nRaw numbers: {files}{run}.")
    return "\n\n".join(parts) + "\n"


def page(name: str, results: Path, path: Path) -> str:
    """The whole page `name` (a file at `path`), from the results in `results`."""
    return f"# {PAGES[name].title}\n\n{body(name, results, path)}"


class Missing(LookupError):
    """A claim's result is stale or absent: the claim is left out until it is measured again."""


class Numbers:
    """The current results, for the claims: `json(path)` raises Missing for a stale or absent one."""

    def __init__(self, results: Path):
        self.results = results

    def json(self, relative: str) -> dict:
        path = self.results / relative
        if not path.exists() or not is_current(path, self.results):
            raise Missing(relative)
        return json.loads(path.read_text())

    def ppl(self, run: str, split: str = "ptb test") -> float:
        """A recipes run's perplexity, e.g. ppl('full/streamed50')."""
        label, name = run.split("/")
        return self.json(f"recipes-{label}/{name}.json")["perplexity"][split]

    def removed(self, run: str) -> float:
        label, name = run.split("/")
        row = self.json(f"recipes-{label}/{name}.json")
        return 1 - row["parameters"]["total"] / row["dense_parameters"]

    def step(self, label: str, batch: str, variant: str) -> float:
        """A step's time over a plain LoRA step's, from overhead-<label>.json."""
        rows = self.json(f"overhead-{label}.json")["rows"]
        return next(r["ratio_vs_plain"] for r in rows if r["batch"] == batch and r["variant"] == variant)

    def peak(self, label: str, criterion: str, batch: str, distill: float = 0.0) -> float:
        """Peak RSS in MiB from memory-<label>.json."""
        for r in self.json(f"memory-{label}.json")["runs"]:
            if (r["criterion"], f"{r['batch']}x{r['seq_len']}", r.get("distill", 0.0)) == (criterion, batch, distill):
                return r["measured"]["peak_rss_MiB"]
        raise Missing(f"memory-{label}: {criterion} {batch}")

    def scale(self, relative: str, criterion: str, point: str) -> dict:
        return next(r for r in self.json(relative)["rows"] if (r["criterion"], r["point"]) == (criterion, point))


def n(x: float) -> str:
    """A measured number as the tables print it: three significant digits, at least one decimal below 100."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def cost(r: Numbers, run: str) -> str:
    """A run's PTB test perplexity against dense + LoRA under the same budget, and what it removed."""
    dense = r.ppl(f"{run.split('/')[0]}/dense-lora")
    return f"{n(r.ppl(run))} vs {n(dense)} ({x(r.ppl(run) / dense)}); {r.removed(run):.1%} of the parameters"


def seeds(r: Numbers, criterion: str) -> list[float]:
    return [r.ppl(f"medium-seed{s}/{criterion}50") for s in range(3)]


def estimate_error(r: Numbers) -> float:
    rows = [row for path in sorted(r.results.glob("scale-*.json")) for row in r.json(path.name)["rows"]]
    errors = [abs(row["estimate_bytes"] / row["peak_bytes"] - 1) for row in rows if "peak_bytes" in row]
    if not errors:
        raise Missing("scale-*.json")
    return max(errors)


def progressive(r: Numbers, ratio: int) -> dict:
    runs = r.json(f"progressive-full-streamed-{ratio}.json")["runs"]
    by = {mode: [run for run in runs if run["mode"] == mode] for mode in ("end", "progressive")}
    loop = {mode: statistics.median(run["loop_seconds"] for run in rs) for mode, rs in by.items()}
    ppl = {mode: statistics.median(run["perplexity"] for run in rs) for mode, rs in by.items()}
    peak = {mode: max(run["peak_rss_MiB"]["pruning loop"] for run in rs) for mode, rs in by.items()}
    return {"loop": loop["progressive"] / loop["end"], "ppl": ppl, "peak": peak}


def iou(r: Numbers, a: str, b: str) -> str:
    """IoU of the groups two recipes runs removed (from their saved masks), e.g. iou(r, 'accum/x', 'accum/y')."""
    one, two = (removed_groups(r.json("recipes-{}/{}.json".format(*run.split("/")))["masks"]) for run in (a, b))
    return f"{removed_iou(one, two):.2f}"


def held_out(r: Numbers, run: str, split: str) -> float:
    """A recipes run's perplexity on `split` over the dense model's as shipped (its label's `dense` run)."""
    return r.ppl(run, split) / r.ppl(f"{run.split('/')[0]}/dense", split)


def general_text_ratios(r: Numbers, run: str, tuned: bool = True, label: str = "general") -> str:
    """A run's PTB test / pydoc / jargon perplexity over the dense model's (recipes-`label`, tuned on
    gcide+foldoc), and with `tuned` its gcide perplexity (the text it tuned on) beside the dense model's."""
    ratios = " / ".join(x(held_out(r, f"{label}/{run}", f"{text} test")) for text in ("ptb", "pydoc", "jargon"))
    if not tuned:
        return ratios
    return f"{ratios}; {n(r.ppl(f'{label}/{run}', 'gcide test'))} vs {n(r.ppl(f'{label}/dense', 'gcide test'))}"


def ratios_and_removed(r: Numbers, run: str, label: str = "general") -> str:
    """general_text_ratios, then the share of the dense model's parameters the run removed."""
    return f"{general_text_ratios(r, run, label=label)} ({r.removed(f'{label}/{run}'):.1%})"


def seed_by_seed(r: Numbers, run: str, other: str) -> str:
    """Two recipes-general runs on seeds 0, 1 and 2 ('{seed}' in their names: '', '-s1', '-s2'), their
    held-out ratios side by side, seed by seed."""
    return "; ".join(
        f"seed {seed}: {general_text_ratios(r, run.format(seed=suffix), tuned=False)} vs "
        f"{general_text_ratios(r, other.format(seed=suffix), tuned=False)}"
        for seed, suffix in enumerate(("", "-s1", "-s2"))
    )


def ptb_pydoc(r: Numbers, run: str) -> str:
    """A recipes run's PTB test / pydoc perplexity, as the shape claims print it."""
    return f"{n(r.ppl(run))} / {n(r.ppl(run, 'pydoc test'))}"


def ptb_pydoc_gcide(r: Numbers, run: str) -> str:
    return f"{ptb_pydoc(r, run)} / {n(r.ppl(run, 'gcide test'))}"


def overhead_ratios(r: Numbers) -> str:
    bench = r.json("overhead-general-topk.json")
    rows = {row["variant"]: row["ratio_vs_plain"] for row in bench["rows"]}
    distill, k = bench["args"]["distill"], bench["args"]["distill_top_k"]
    return (f"top-{k}: {x(rows[f'LoRAPrune (streamed, distill {distill:g}, top-{k})'])} vs "
            f"{x(rows[f'LoRAPrune (streamed, distill {distill:g})'])}")  # fmt: skip


def llamacpp_speedup(r: Numbers, file: str, label: str, kind: str) -> str:
    """A bench.serving model's prompt (pp512) / generation (tg128) tokens/s over the dense file's of that type."""
    rows = {(row["label"], row["outtype"]): row["tokens_per_s"] for row in r.json(file)["rows"]}
    return " / ".join(x(rows[label, kind][t] / rows["dense", kind][t]) for t in ("pp512", "tg128"))


def llamacpp_speedups(r: Numbers, file: str, label: str) -> str:
    """llamacpp_speedup at f16 and at q4_k_m."""
    return ", ".join(f"{llamacpp_speedup(r, file, label, kind)} ({kind})" for kind in ("f16", "q4_k_m"))


def transformers_speedups(r: Numbers, file: str, variant: str) -> str:
    """A bench.speed variant's 1 x 512 forward / greedy generation speedup over the dense model."""
    return " / ".join(x(row["speedup"]) for row in r.json(file)["rows"]
                      if row["variant"] == variant and row["shape"] in ("1x512", "generate 32"))  # fmt: skip


def serving_speedups(r: Numbers) -> str:
    unaligned = llamacpp_speedup(r, "serving-smollm2.json", "pl20", "f16")
    return f"{llamacpp_speedups(r, 'serving-smollm2.json', 'pl20a')}; unaligned {unaligned}"


def agreement(model: dict) -> str:
    same = "identical" if model["greedy_tokens_equal"] else "different"
    return f"{model['logits_max_abs_diff']:.1e}; {same}"


@dataclass(frozen=True)
class Claim:
    topic: str
    text: str
    number: Callable[[Numbers], str]
    page: str  # docs/benchmarks/<page>.md, and a section


GiB = 2**30
# the shapes measured on Gemma 3 270M at each size: at 40% heads, channels and layers alone are out of reach
SHAPES_GEMMA3 = ((25, ("width", "hidden", "depth", "auto")), (40, ("hidden", "auto")))

CLAIMS = [
    Claim("Quality", "`streamed` (the default) against the true gradient's `gradient`, 50%, full budget: PTB test "
          "perplexity", lambda r: f"{n(r.ppl('full/streamed50'))} vs {n(r.ppl('full/gradient50'))}", "recipes#full"),
    Claim("Quality", "The same at 240 steps, 50% / 20%", lambda r: f"{n(r.ppl('budget240/streamed50'))} vs "
          f"{n(r.ppl('budget240/gradient50'))} / {n(r.ppl('budget240/streamed20'))} vs "
          f"{n(r.ppl('budget240/gradient20'))}", "recipes#budget240"),
    Claim("Quality", "`streamed` against the paper's `lora`, 50%, medium budget, three seeds: PTB test perplexity "
          "per seed (mean)", lambda r: " / ".join(n(v) for v in seeds(r, "streamed"))
          + f" ({n(statistics.mean(seeds(r, 'streamed')))}) vs " + " / ".join(n(v) for v in seeds(r, "lora"))
          + f" ({n(statistics.mean(seeds(r, 'lora')))})", "recipes#medium-seed0"),
    Claim("Quality", "What pruning 20% of the heads and channels costs, full budget: PTB test perplexity against "
          "dense + LoRA with the same steps, and the parameters removed", lambda r: cost(r, "full/streamed20"),
          "recipes#full"),
    Claim("Quality", "The same at 50%", lambda r: cost(r, "full/streamed50"), "recipes#full"),
    Claim("Quality", "Twice the steps (240): PTB test perplexity at 20% / 50%",
          lambda r: f"{n(r.ppl('budget240/streamed20'))} / {n(r.ppl('budget240/streamed50'))}", "recipes#budget240"),
    Claim("Quality", "Out of domain (Python's documentation), 20%, full budget: pruned vs dense + LoRA",
          lambda r: f"{n(r.ppl('full/streamed20', 'pydoc test'))} vs {n(r.ppl('full/dense-lora', 'pydoc test'))} "
          f"({x(r.ppl('full/streamed20', 'pydoc test') / r.ppl('full/dense-lora', 'pydoc test'))})", "recipes#full"),
    Claim("Quality", "Held-out text against the dense model as shipped, 20%, first 200 windows: the default tuned "
          "on PTB vs `--distill 1` (whole logits) on `gcide+foldoc`, pydoc / PTB test perplexity ratios",
          lambda r: f"{x(held_out(r, 'general-ptb/streamed20-ptb', 'pydoc test'))} / "
          f"{x(held_out(r, 'general-ptb/streamed20-ptb', 'ptb test'))} vs "
          f"{x(held_out(r, 'general/streamed20-kdfull-120', 'pydoc test'))} / "
          f"{x(held_out(r, 'general/streamed20-kdfull-120', 'ptb test'))}", "recipes#general"),
    Claim("Quality", "What the dense model's top-K (`--distill-top-k K`, progressive) costs against its whole logits "
          "(shrink at the end), 20%, 120 steps of `--distill 1` on `gcide+foldoc`: pydoc / PTB test perplexity, "
          "K = 64 vs 256 vs the whole logits", lambda r: " vs ".join(
              f"{n(r.ppl(f'general/streamed20-{run}-120', 'pydoc test'))} / {n(r.ppl(f'general/streamed20-{run}-120'))}"
              for run in ("kd64", "kd256", "kdfull")), "recipes#general"),
    Claim("Speed", "llama.cpp, 2 threads: a 20% per-layer model with MLP widths a multiple of 256 (`--multiple-of "
          "256`) against the dense model, prompt (pp512) / generation (tg128) tokens/s at f16 and at q4_k_m; the "
          "unaligned one at f16", lambda r: serving_speedups(r), "serving"),
    Claim("Quality", "What `--multiple-of 256` costs, 20%, 120 steps on PTB, first 200 windows: PTB test / pydoc "
          "perplexity, aligned vs not", lambda r: " vs ".join(
              f"{n(r.ppl(f'general-ptb/{run}'))} / {n(r.ppl(f'general-ptb/{run}', 'pydoc test'))}"
              for run in ("streamed20-ptb-a256", "streamed20-ptb")), "recipes#general-ptb"),
    Claim("Serving", "What q4_k_m costs in llama.cpp against the same file at f16, PTB test / pydoc perplexity "
          "ratio: 20% aligned to 256 after 120 PTB steps vs the dense model", lambda r: " vs ".join(
              " / ".join(x(q4_over_f16(r.json("serving-trained.json")["rows"], label, text))
                         for text in ("ptb", "pydoc"))
              for label in ("pl20a", "dense")), "serving#trained"),
    Claim("Quality", "Shapes at 25% of all parameters removed, 120 steps on PTB: PTB test / pydoc perplexity for "
          "heads and channels only, hidden size only, whole layers (+ a little width), and layers + hidden + width",
          lambda r: " vs ".join(ptb_pydoc(r, f"shape/{run}")
                                for run in ("width25", "hidden25", "depth25", "mix25")), "recipes#shape"),
    Claim("Quality", "At 40% of all parameters: PTB test / pydoc perplexity for heads and channels only, hidden "
          "size only, and layers + hidden + width", lambda r: " vs ".join(
              ptb_pydoc(r, f"shape/{run}")
              for run in ("width40", "hidden40", "mix40")), "recipes#shape"),
    Claim("Quality", "Which layers go (`--layer-score`), the depth shape at 25%: PTB test / pydoc perplexity with "
          "`similarity` vs `taylor`", lambda r: " vs ".join(
              ptb_pydoc(r, f"shape/{run}")
              for run in ("depth25", "depth25-taylor")), "recipes#shape"),
    Claim("Quality", "`--target-shape mix` against heads and channels alone (`width`) at 25% and 40% of all "
          "parameters: PTB test / pydoc perplexity", lambda r: "; ".join(
              f"{ptb_pydoc(r, f'shape/auto{size}')} vs {ptb_pydoc(r, f'shape/width{size}')}"
              for size in (25, 40)), "recipes#shape"),
    Claim("Quality", "`--target-shape mix` against `width` at 25% on seeds 1 and 2: PTB test / pydoc / gcide "
          "perplexity",
          lambda r: "; ".join(" vs ".join(ptb_pydoc_gcide(r, f"shape/{run}25-s{seed}") for run in ("auto", "width"))
                              for seed in (1, 2)), "recipes#shape"),
    Claim("Quality", "`--target-shape mix` against `width` at 25% of all parameters under the default recipe "
          "(120 steps): PTB test / pydoc / jargon perplexity over the dense model's, `mix` vs `width`; gcide "
          "(tuned) for `mix` vs `width` vs dense", lambda r: " vs ".join(
              general_text_ratios(r, f"{run}25-kd256a90-120", tuned=False) for run in ("mix", "width"))
          + "; " + " vs ".join(n(r.ppl(f"general/{run}", "gcide test"))
                               for run in ("mix25-kd256a90-120", "width25-kd256a90-120", "dense")),
          "recipes#general"),
    Claim("Speed", "The same shapes in transformers (brief prunes: speed depends on the shape alone): 1 x 512 forward "
          "/ greedy generation speedup over the dense model", lambda r: " vs ".join(
              transformers_speedups(r, "speed-shape.json", run)
              for run in ("width25", "hidden25", "depth25", "mix25")), "speed#shape"),
    Claim("Speed", "`--target-shape mix` against `width` in transformers at 25% / 40% of all parameters: 1 x 512 "
          "forward / greedy generation speedup over the dense model", lambda r: "; ".join(
              " vs ".join(transformers_speedups(r, "speed-shape-mix.json", f"{run}{size}") for run in ("auto", "width"))
              for size in (25, 40)), "speed#shape-mix"),
    Claim("Speed", "`--target-shape mix` against `width` at 25% of all parameters in llama.cpp, 2 threads: prompt "
          "(pp512) / generation (tg128) speedup over the dense model at f16 and at q4_k_m", lambda r: " vs ".join(
              llamacpp_speedups(r, "serving-shape-mix.json", f"{run}25-s1") for run in ("auto", "width")),
          "serving#shape-mix"),
    Claim("Speed", "The same with MLP widths a multiple of 256 (`--multiple-of 256`), seed 0: prompt / generation "
          "speedup over the dense model at f16 and at q4_k_m, `mix` vs `width`", lambda r: " vs ".join(
              llamacpp_speedups(r, "serving-shape-mix-a256.json", f"{run}25-a256") for run in ("auto", "width")),
          "serving#shape-mix-a256"),
    Claim("Quality", "`--target-shape mix` against `width` at 25% with `--multiple-of 256`, seed 0: PTB test / pydoc "
          "/ gcide perplexity (parameters removed)", lambda r: " vs ".join(
              f"{ptb_pydoc_gcide(r, f'shape/{run}25-a256')} ({r.removed(f'shape/{run}25-a256'):.1%})"
              for run in ("auto", "width")), "recipes#shape"),
    Claim("Quality", "Gemma 3 270M at 25% of all parameters, 120 steps on PTB: PTB test / pydoc / gcide perplexity "
          "for heads and channels only, hidden size only, layers + width, and `--target-shape mix` (dense as loaded "
          "last)", lambda r: " vs ".join(
              ptb_pydoc_gcide(r, f"shape-gemma3/{run}")
              for run in ("width25", "hidden25", "depth25", "auto25", "dense")), "recipes#shape-gemma3"),
    Claim("Quality", "Gemma 3 270M at 40% (out of reach of heads, channels and layers alone): PTB test / pydoc / gcide "
          "perplexity, hidden size only vs `--target-shape mix`", lambda r: " vs ".join(
              ptb_pydoc_gcide(r, f"shape-gemma3/{run}") for run in ("hidden40", "auto40")), "recipes#shape-gemma3"),
    Claim("Speed", "Gemma 3 270M in transformers: 1 x 512 forward / greedy generation speedup over the dense model, "
          "the same shapes at 25% (width, hidden, layers, mix), then at 40% (hidden, mix)", lambda r: "; ".join(
              " vs ".join(transformers_speedups(r, "speed-shape-gemma3.json", f"{run}{size}") for run in runs)
              for size, runs in SHAPES_GEMMA3),
          "speed#shape-gemma3"),
    Claim("Speed", "Gemma 3 270M in llama.cpp, 2 threads, the same shapes from 10-step `loraprune prune --uniform` "
          "runs (llama.cpp's Gemma 3 takes one layer shape; layers + width: `--layer-ratio 0.44`, 8 of 18): prompt "
          "(pp512) / generation (tg128) speedup over the dense model at f16, at 25% (width, hidden, layers, mix), "
          "then at 40% (hidden, mix)", lambda r: "; ".join(
              " vs ".join(llamacpp_speedup(r, "serving-shape-gemma3.json", f"{run}{size}", "f16") for run in runs)
              for size, runs in SHAPES_GEMMA3), "serving#shape-gemma3"),
    Claim("Quality", "Held-out text against the dense model as shipped, 20%, 500 steps of `--distill 0.9` on "
          "`gcide+foldoc`, first 200 windows: PTB test / pydoc / jargon ratios; gcide (tuned) vs dense",
          lambda r: general_text_ratios(r, "streamed20-kdfull90-500"), "recipes#general"),
    Claim("Quality", "The default recipe (500 steps on `gcide+foldoc`, `--distill 0.9` from the top 256) at 20% on "
          "seeds 0, 1, 2, first 200 windows: PTB test / pydoc / jargon perplexity over the dense model's",
          lambda r: "; ".join(general_text_ratios(r, f"streamed20-kd256a90-500{seed}", tuned=False)
                              for seed in ("", "-s1", "-s2")), "recipes#general"),
    Claim("Quality", "The default recipe with each criterion, 20%, 500 steps: PTB test / pydoc / jargon perplexity "
          "over the dense model's for `streamed` vs `lora` vs `gradient`", lambda r: " vs ".join(
              general_text_ratios(r, f"{criterion}20-kd256a90-500", tuned=False)
              for criterion in ("streamed", "lora", "gradient")), "recipes#general"),
    Claim("Quality", "The default recipe on seed 1 (its worst on PTB), 20%, 500 steps, with each pruned layer losing "
          "its own lowest groups (`--allocation layer`, the default) vs the lowest across layers (`--allocation "
          "global`) vs `--distill-temperature 2`: PTB test / pydoc / jargon perplexity over the dense model's "
          "(gcide, tuned: perplexity; the dense model's last)", lambda r: " vs ".join(
              f"{general_text_ratios(r, run, tuned=False)} ({n(r.ppl(f'general/{run}', 'gcide test'))})"
              for run in ("streamed20-kd256a90-500-s1", "streamed20-kd256a90-500-s1-global",
                          "streamed20-kd256a90-500-s1-t2")) + f"; {n(r.ppl('general/dense', 'gcide test'))}",
          "recipes#general"),
    Claim("Quality", "`--allocation global` against the default's `layer` on seeds 0, 1 and 2, 20%, 500 steps: PTB "
          "test / pydoc / jargon perplexity over the dense model's", lambda r: seed_by_seed(
              r, "streamed20-kd256a90-500{seed}-global", "streamed20-kd256a90-500{seed}"), "recipes#general"),
    Claim("Quality", "The same recipe at 50% of the groups, `--allocation layer` (the default) vs `global` vs "
          "`global --cooldown 0.2`: PTB test / pydoc / jargon perplexity over the dense model's; gcide (tuned) vs "
          "dense (parameters removed)",
          lambda r: " vs ".join(ratios_and_removed(r, run) for run in (
              "streamed50-kd256a90-500", "streamed50-kd256a90-500-global", "streamed50-kd256a90-500-global-c20")),
          "recipes#general"),
    Claim("Quality", "At 50% on seeds 0, 1 and 2: `--allocation layer` (the default) vs `global --cooldown 0.2`, "
          "PTB test / pydoc / jargon perplexity over the dense model's", lambda r: seed_by_seed(
              r, "streamed50-kd256a90-500{seed}", "streamed50-kd256a90-500{seed}-global-c20"), "recipes#general"),
    Claim("Quality", "At 50% on seed 1 (the worst of the three under `global --cooldown 0.2`), that recipe as it is vs "
          "with `--distill 1 --min-keep 0.3` vs `--lora-r 32 --lora-alpha 64` vs `--lr 1e-3`: PTB test / pydoc / "
          "jargon perplexity over the dense model's; gcide (tuned) vs dense (parameters removed)",
          lambda r: " vs ".join(ratios_and_removed(r, f"streamed50-kd256a{run}") for run in (
              "90-500-s1-global-c20", "100-500-s1-global-c20-mk30", "90-500-s1-global-c20-r32",
              "90-500-s1-global-c20-lr1e3")),
          "recipes#general"),
    Claim("Quality", "At 50% on seed 2, `global --cooldown 0.2` vs the same with `--lr 1e-3`: PTB test / pydoc / "
          "jargon perplexity over the dense model's", lambda r: " vs ".join(general_text_ratios(r, run, tuned=False)
              for run in ("streamed50-kd256a90-500-s2-global-c20", "streamed50-kd256a90-500-s2-global-c20-lr1e3")),
          "recipes#general"),
    Claim("Quality", "The default recipe on Gemma 3 270M, 20% of the groups, 500 steps, first 100 windows: PTB test "
          "/ pydoc / jargon perplexity over the dense model's; gcide (tuned) vs dense (parameters removed), for "
          "`streamed` (the default) vs `lora` vs `gradient`", lambda r: " vs ".join(
              ratios_and_removed(r, f"{criterion}20-kd256a90-500", "general-gemma3")
              for criterion in ("streamed", "lora", "gradient")),
          "recipes#general-gemma3"),
    Claim("Quality", "Gemma 3 270M, nothing pruned: 120 LoRA steps on `gcide+foldoc` with the task loss alone, first "
          "100 windows: PTB test / pydoc / jargon perplexity over the dense model's; gcide (tuned) vs dense",
          lambda r: general_text_ratios(r, "dense-lora-120", label="general-gemma3"), "recipes#general-gemma3"),
    Claim("Quality", "How long to run it, 20%: 250 vs 500 vs 1,000 steps, PTB test / pydoc / jargon perplexity over "
          "the dense model's; gcide (tuned) vs dense", lambda r: "; ".join(
              f"{steps} steps: {general_text_ratios(r, f'streamed20-kd256a90-{steps}')}" for steps in (250, 500, 1000)),
          "recipes#general"),
    Claim("Speed", "A step distilling from the dense model's top-K (`--distill-top-k`) against a plain LoRA "
          "step (4x128, alternated), and against "
          "the live teacher's step", lambda r: overhead_ratios(r), "overhead#general-topk"),
    Claim("Quality", "`--distill 0.9` keeps text outside the tuning data, 20%, full budget: pydoc perplexity (vs dense "
          "+ LoRA), and what it costs on PTB test", lambda r: f"{n(r.ppl('full/streamed20-kd9', 'pydoc test'))} "
          f"({x(r.ppl('full/streamed20-kd9', 'pydoc test') / r.ppl('full/dense-lora', 'pydoc test'))}); PTB "
          f"{n(r.ppl('full/streamed20-kd9'))}", "recipes#full"),
    Claim("Quality", "Distillation alone (α 1.0) is worse out of domain than α 0.9, 20%, medium budget: pydoc "
          "perplexity", lambda r: f"{n(r.ppl('medium/lora20-kd10', 'pydoc test'))} vs "
          f"{n(r.ppl('medium/lora20-kd9-bf16', 'pydoc test'))}", "recipes#medium"),
    Claim("Quality", "`streamed` under `--grad-accum 4` (4 micro-batches of 1, per-micro-batch sums) against one "
          "batch of 4, 50%, full budget: PTB test / pydoc perplexity (first 400 windows), and the share of removed "
          "groups the two have in common (IoU)",
          lambda r: f"{n(r.ppl('accum/streamed50-ga4'))} / {n(r.ppl('accum/streamed50-ga4', 'pydoc test'))} vs "
          f"{n(r.ppl('accum/streamed50-b4'))} / {n(r.ppl('accum/streamed50-b4', 'pydoc test'))}; IoU "
          f"{iou(r, 'accum/streamed50-ga4', 'accum/streamed50-b4')}", "recipes#accum"),
    Claim("Memory", "Peak RSS of a step, SmolLM2 float32, 4 x 128: `streamed` / `lora` / `gradient`",
          lambda r: f"{n(r.peak('streamed', 'streamed', '4x128'))} / {n(r.peak('streamed', 'lora', '4x128'))} / "
          f"{n(r.peak('streamed', 'gradient', '4x128'))} MiB", "memory#streamed"),
    Claim("Memory", "The default recipe's step (`streamed`, `--distill 0.9` from the top 256) against a plain "
          "`streamed` step, 4 x 128: peak RSS", lambda r: f"{n(r.peak('general-topk', 'streamed', '4x128', 0.9))} "
          f"vs {n(r.peak('general-topk', 'streamed', '4x128'))} MiB", "memory#general-topk"),
    Claim("Memory", "A distilled step (`--distill 0.5`) against a plain one, 4 x 128: peak RSS",
          lambda r: f"{n(r.peak('distill', 'lora', '4x128', 0.5))} vs {n(r.peak('distill', 'lora', '4x128'))} MiB",
          "memory#distill"),
    Claim("Memory", "LLaMA-7B shape, bfloat16, 1 x 128 with checkpointing: peak of `lora` / `streamed`; `gradient` "
          "is refused by the pre-flight at its estimate",
          lambda r: f"{r.scale('scale-llama-7b.json', 'lora', '1x128:on')['peak_bytes'] / GiB:.2f} / "
          f"{r.scale('scale-streamed/scale-llama-7b.json', 'streamed', '1x128:on')['peak_bytes'] / GiB:.2f} GiB; "
          f"{r.scale('scale-llama-7b.json', 'gradient', '1x128:on')['estimate_bytes'] / GiB:.1f} GiB",
          "scale#cpu"),
    Claim("Memory", "Llama-3.2-3B shape, 1 x 512 with checkpointing: peak `lora` / `gradient`",
          lambda r: " / ".join(f"{r.scale('scale-llama-3.2-3b.json', c, '1x512:on')['peak_bytes'] / GiB:.2f}"
          for c in ("lora", "gradient")) + " GiB", "scale#cpu"),
    Claim("Memory", "The pre-flight's estimate against every measured peak at 0.36B-7B shapes: largest error",
          lambda r: f"{estimate_error(r):.1%}", "scale#cpu"),
    Claim("Time", "A step against a plain LoRA step, 4 x 128: `lora` / `streamed` / `gradient`",
          lambda r: " / ".join(x(r.step("streamed", "4x128", f"LoRAPrune ({c})")) for c in ("lora", "streamed",
          "gradient")), "overhead#streamed"),
    Claim("Time", "The same at 1 x 128, where the score update weighs more", lambda r: " / ".join(
          x(r.step("streamed", "1x128", f"LoRAPrune ({c})")) for c in ("lora", "streamed", "gradient")),
          "overhead#streamed"),
    Claim("Time", "A step after the last pruning step (the cooldown) against a plain LoRA step, 4 x 128, masks on "
          "(as `--shrink end`): `streamed` / `gradient`", lambda r: " / ".join(
          x(r.step("cooldown", "4x128", f"LoRAPrune ({c}, cooldown)")) for c in ("streamed", "gradient")),
          "overhead#cooldown"),
    Claim("Time", "`streamed` and `streamed --distill 0.9` against a plain LoRA step, 4 x 128, another machine",
          lambda r: f"{x(r.step('streamed-distill', '4x128', 'LoRAPrune (streamed)'))} / "
          f"{x(r.step('streamed-distill', '4x128', 'LoRAPrune (streamed, distill 0.9)'))}",
          "overhead#streamed-distill"),
    Claim("Time", "A distilled `lora` step (`--distill 0.5`), 4 x 128: teacher in bfloat16 (auto) / float32",
          lambda r: f"{x(r.step('distill', '4x128', 'LoRAPrune (lora, distill 0.5)'))} / "
          f"{x(r.step('distill', '4x128', 'LoRAPrune (lora, distill 0.5, teacher model)'))}", "overhead#distill"),
    Claim("Time", "The chunked loss against transformers' whole-logits loss: plain LoRA step, 4 x 128 / 1 x 512",
          lambda r: f"{x(1 / r.step('loss', '4x128', 'plain LoRA (whole logits)'))} / "
          f"{x(1 / r.step('loss', '1x512', 'plain LoRA (whole logits)'))}", "overhead#loss"),
    Claim("Time", "Score update of a Llama-3.2-1B shape with the allocator of a tight run: reused block buffers vs "
          "a fresh tensor per block", lambda r: " vs ".join(
          f"{row['median_s']:.2f} s" for row in r.json("score_blocks-llama-3.2-1b-tight-cpu.json")["rows"]
          if row["variant"] in ("default", "fresh")), "score_blocks#llama-32-1b-tight-cpu"),
    Claim("Time", "`--shrink progressive` against `end`, `streamed`, full budget: pruning-loop time at 50% / 20%",
          lambda r: f"{x(progressive(r, 50)['loop'])} / {x(progressive(r, 20)['loop'])}",
          "progressive#full-streamed-50"),
    Claim("Time", "... with the same PTB test perplexity, progressive vs end, 50% / 20%",
          lambda r: " / ".join(f"{n(p['ppl']['progressive'])} vs {n(p['ppl']['end'])}" for p in
          (progressive(r, 50), progressive(r, 20))), "progressive#full-streamed-50"),
    Claim("Serving", "llama.cpp against transformers on the 50% per-layer GGUF (llama.cpp's `deci`): largest logit "
          "difference; greedy tokens", lambda r: agreement(r.json("llamacpp-check.json")["models"]["pl50"]),
          "llamacpp#check"),
    Claim("Serving", "llama.cpp generation, tokens per CPU second at 1 thread: dense / 50% `--uniform` / 50% per layer",
          lambda r: " / ".join(n(r.json("llamacpp-cputime.json")["models"][m]["cpu_time_1_thread"]
          ["tg_tokens_per_cpu_s_best"]) for m in ("dense", "u50", "pl50")), "llamacpp#cputime"),
]  # fmt: skip


def q4_over_f16(rows: list[dict], label: str, text: str) -> float:
    """llama-perplexity of a model's q4_k_m file over its f16 file's, on one text."""
    ppl = {r["outtype"]: r["perplexity"][text]["perplexity"] for r in rows if r["label"] == label}
    return ppl["q4_k_m"] / ppl["f16"]


INTRO = """# Benchmarks

What this implementation measurably does: SmolLM2-135M-Instruct in float32 on Penn Treebank unless a row
says otherwise. Every number comes from the JSON in `bench/results/`; the page in the last column says
how it was measured and holds the whole tables and the commands. Budgets: *full* is 120 steps of 4 x 128
tokens (lr 5e-4, pruning every 10 steps) and the whole PTB test split; *medium* is 60 steps of 2 x 128
(pruning every 5) and the first 150 windows of each split. Ratios are of heads and MLP channels in each
pruned layer. Times are ratios measured side by side in one process.

This file and the pages are written by `python -m bench.pages` from the JSON alone (nothing is rerun);
a benchmark script rewrites its page after each run.
"""


def claims(results: Path, pages: str = "docs/benchmarks") -> str:
    """BENCHMARKS.md: the claims whose results are current, a table per topic, then the pages with none."""
    numbers, out, topic = Numbers(results), [INTRO], None
    topics = list(dict.fromkeys(claim.topic for claim in CLAIMS))  # a table per topic, in first-seen order
    for claim in sorted(CLAIMS, key=lambda claim: topics.index(claim.topic)):
        try:
            number = claim.number(numbers)
        except Missing as missing:
            print(f"[pages] claim left out, {missing.args[0]} is not current: {claim.text}", file=sys.stderr)
            continue
        if claim.topic != topic:
            topic = claim.topic
            out.append(f"\n## {topic}\n\n| claim | measured | how |\n|---|---|---|")
        name, _, anchor = claim.page.partition("#")
        target = f"{pages}/{name}.md" + (f"#{anchor}" if anchor else "")
        out.append(f"| {claim.text} | {number} | [{name}]({target}) |")
    stale = [name for name in PAGES if not results_of(name, results) and results_of(name, results, stale_too=True)]
    never = [name for name in PAGES if not results_of(name, results, stale_too=True)]
    for names, why in ((stale, "the last runs measured code that has changed since"), (never, "not run yet")):
        if names:
            pages_list = ", ".join(f"[{name}]({pages}/{name}.md)" for name in names)
            out.append(f"\nNo current numbers ({why}; each page says how to measure): {pages_list}.")
    return "\n".join(out) + "\n"


def outputs(results: Path, pages: Path, claims_file: Path = CLAIMS_FILE) -> dict[Path, str]:
    """Every file `python -m bench.pages` writes, and its text."""
    files = {pages / f"{name}.md": page(name, results, pages / f"{name}.md") for name in PAGES}
    files[claims_file] = claims(results, Path(os.path.relpath(pages, claims_file.parent)).as_posix())
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(common.RESULTS), help="folder of the JSON results")
    p.add_argument("--pages", default=str(common.PAGES), help="folder of the pages")
    p.add_argument("--claims", default=str(CLAIMS_FILE), help="the table of claims")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    args = p.parse_args(argv)
    changed = []
    for path, text in outputs(Path(args.results), Path(args.pages), Path(args.claims)).items():
        if path.exists() and path.read_text() == text:
            continue
        changed.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in changed:
        print(f"{'stale' if args.check else 'wrote'}: {os.path.relpath(path)}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
