"""`loraprune eval --tasks`: EleutherAI's lm-eval harness on a model loaded by loraprune, offline.

Two tasks of our own (harness_tasks/*.yaml) score a local text with the harness's rolling
loglikelihood: `ptb_local` (PTB test, from the `treebank` package) and `local_text` (`--data
FILE`), in documents of 100 lines (harness_tasks/local_docs.py; `--limit N` scores the first N).
Any other harness task runs only if its dataset is already in the local cache.

Windows. lm-eval's HFLM.loglikelihood_rolling cuts the token stream t of a document with
utils.get_rolling_token_windows(context_len=1) + make_disjoint_window: with max_length M, the
first window feeds [prefix] + t[0:M-1] and scores t[0:M] (prefix = BOS, else EOS); window k >= 1
feeds t[kM-1 : kM+M-1] and scores t[kM : kM+M]; a last short window is scored with full context.
So each window is M + 1 tokens, the first only context, and consecutive windows share one token:
every token is scored exactly once. loraprune's evaluator scores seq_len - 1 tokens of each
non-overlapping seq_len-token window. We pass max_length = seq_len - 1: a harness window is then
exactly one of our windows (seq_len tokens, the first only context, a token at offset j seeing j
tokens), only laid out with stride seq_len - 1 from a prefix token instead of stride seq_len:
  harness ≡ perplexity(model, windows of [prefix] + t, length seq_len, stride seq_len - 1)
for each document (tests/test_harness.py checks this to float precision). Against our default
windows it differs in which tokens are scored: the harness also scores each document's first
token (from the prefix token alone), the first token of each of our windows and our dropped
remainder. token_perplexity = exp(-sum of the documents' loglikelihoods / their token count).
"""

import logging
import math
import os
import re
import time
from pathlib import Path

from tqdm import tqdm

# Harness tasks name hub datasets: never try to fetch one (datasets reads these at import).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ..errors import LoraPruneError  # noqa: E402

TASK_DIR = Path(__file__).parent / "harness_tasks"
LOCAL_TASKS = {
    "ptb_local": "perplexity on the PTB test split (offline, from the treebank package)",
    "local_text": "perplexity on the --data .txt/.jsonl file",
}
DOWNLOAD_HINTS = ("couldn't reach", "offline", "not found in cache", "connection")


def local_task_list() -> str:
    return ", ".join(f"{name} ({what})" for name, what in LOCAL_TASKS.items())


def parse_tasks(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise LoraPruneError(f"--tasks is empty; give task names, e.g. {', '.join(LOCAL_TASKS)}")
    return list(dict.fromkeys(names))  # de-duplicated, order kept


def _import_harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise LoraPruneError("--tasks needs lm-eval, which is not installed: pip install 'loraprune[eval]'") from e
    # the harness logs every request batch and a warning for a non-string `pretrained`
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _needs_download(error: BaseException) -> bool:
    seen = error
    while seen is not None:
        text = f"{type(seen).__name__} {seen}".lower()
        if isinstance(seen, ConnectionError) or any(hint in text for hint in DOWNLOAD_HINTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def load_tasks(names: list[str], data: str | None) -> dict:
    """lm-eval's task dict for `names`, or a one-line LoraPruneError for each way it can fail."""
    _import_harness()
    from lm_eval.tasks import TaskManager

    if "local_text" in names and not data:
        raise LoraPruneError("task local_text needs --data FILE (a .txt or .jsonl file)")
    local = [name for name in names if name in LOCAL_TASKS]
    other = [name for name in names if name not in LOCAL_TASKS]
    metadata = {"data": data} if data else None
    loaded = {"tasks": {}, "groups": {}, "group_map": {}}
    if local:
        # our folder alone: indexing the harness's ~15k built-in task files takes seconds
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=metadata)
        _merge(loaded, _load(manager, local))
    if other:
        manager = TaskManager(metadata=metadata)
        unknown = [name for name in other if name not in manager.all_tasks]
        if unknown:
            raise LoraPruneError(
                f"unknown task(s) {', '.join(unknown)}; loraprune's offline tasks: {local_task_list()}; "
                "or an lm-eval task (`lm_eval ls tasks`) whose dataset is already cached"
            )
        _merge(loaded, _load(manager, other))
    return loaded


def _load(manager, names: list[str]) -> dict:
    tasks = {}
    for name in names:  # one at a time, to name the task that failed
        try:
            tasks = _merge(tasks, manager.load([name]))
        except LoraPruneError:
            raise
        except Exception as e:
            if name not in LOCAL_TASKS and _needs_download(e):
                raise LoraPruneError(
                    f"task {name} needs to download its dataset, which is not possible offline; "
                    f"use {' or '.join(LOCAL_TASKS)}, or pre-cache it"
                ) from e
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LoraPruneError(f"task {name} could not be loaded: {first_line}") from e
    return tasks


def _merge(into: dict, more: dict) -> dict:
    for key in ("tasks", "groups", "group_map"):
        into.setdefault(key, {}).update(more.get(key, {}))
    return into


def run_harness(
    model,
    tokenizer,
    tasks: list[str] | dict,
    data: str | None,
    seq_len: int,
    batch_size: int = 8,
    limit: int | None = None,
    show_progress: bool = False,
) -> dict:
    """Run lm-eval tasks (names, or load_tasks' dict) on an in-memory causal LM.

    Harness windows hold `seq_len` tokens, as loraprune's (see the module doc); `limit` is the
    harness's: the first N documents of each task (our local tasks are one document each).
    """
    if seq_len < 2:
        raise LoraPruneError(f"--seq-len must be at least 2 (got {seq_len})")
    task_dict = tasks if isinstance(tasks, dict) else load_tasks(tasks, data)
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM with one progress bar over all scored windows instead of a bar per batch."""

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            out = super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            progress.update(len(requests))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

    # add_bos_token=False: the document's tokens are exactly tokenizer(text, add_special_tokens=False), as ours
    lm = QuietHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        max_length=seq_len - 1,
        batch_size=batch_size,
        add_bos_token=False,
    )
    started = time.perf_counter()
    # evaluate(), not simple_evaluate(): no environment/git probing, no model re-loading
    with tqdm(desc="harness", unit=" windows", disable=not show_progress) as progress:
        output = evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - started
    tasks = {}
    for name, metrics in output["results"].items():
        clean = {re.sub(r",none$", "", key): value for key, value in metrics.items() if key not in ("alias", "name")}
        clean = {("documents" if key == "sample_len" else key): value for key, value in clean.items()}
        clean = {key: value for key, value in clean.items() if not key.endswith("_stderr") and value != "N/A"}
        samples = output.get("samples", {}).get(name, [])
        if samples and all(isinstance(s.get("target"), str) and _rolling(s) for s in samples):
            # token perplexity: the harness sums loglikelihoods per document; we count the tokens
            loglikelihood = sum(float(s["resps"][0][0]) for s in samples)
            tokens = sum(len(lm.tok_encode(s["target"])) for s in samples)
            clean.update(
                token_perplexity=math.exp(-loglikelihood / tokens),
                loglikelihood=loglikelihood,
                tokens=tokens,
            )
        tasks[name] = clean
    return {
        "tasks": tasks,
        "seq_len": seq_len,
        "harness_max_length": seq_len - 1,
        "prefix_token_id": lm.prefix_token_id,
        "limit": limit,
        "harness_seconds": seconds,
    }


def _rolling(sample: dict) -> bool:
    resps = sample.get("resps")
    return bool(resps) and isinstance(resps[0], (list, tuple)) and isinstance(resps[0][0], float)


def harness_eval(
    model: str, tasks: str, data: str | None, seq_len: int, batch_size: int = 8, limit: int | None = None
) -> dict:
    """`loraprune eval --tasks`: load `model` as every other command does, then run the harness."""
    from ..pipeline.load import load_model

    if seq_len < 2:
        raise LoraPruneError(f"--seq-len must be at least 2 (got {seq_len})")
    task_dict = load_tasks(parse_tasks(tasks), data)  # a bad task fails before a model is loaded
    loaded, tokenizer = load_model(model)
    result = run_harness(loaded, tokenizer, task_dict, data, seq_len, batch_size, limit, show_progress=True)
    result.update(model=model, data=data)
    return result


def format_harness(result: dict) -> str:
    lines = [
        f"lm-eval harness on {result['model']}: windows of {result['seq_len']} tokens "
        f"(HFLM max_length {result['harness_max_length']}, 1 context token + {result['harness_max_length']} scored)"
        + (f", first {result['limit']} document(s) per task" if result.get("limit") else ""),
        f"{'task':<16}{'metric':<20}{'value':>14}",
    ]
    for name, metrics in result["tasks"].items():
        for metric, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{name:<16}{metric:<20}{shown:>14}")
    lines.append(f"harness {result['harness_seconds']:.0f} s, wall time {result.get('seconds', 0):.0f} s")
    return "\n".join(lines)
