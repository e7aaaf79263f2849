"""Run GGUF exports in llama.cpp and compare with transformers (`make llamacpp-check`).

For each LABEL=MODEL (a loraprune output folder, 'smollm2', ...): export it to GGUF, run
lp-logits (scripts/llamacpp/logits.cpp) on a prompt, and compare llama.cpp's tokens, logits at
every prompt position and greedy continuation with transformers' on the same model. With --tiny,
also tiny random Qwen2 and biased Llama models, pruned per layer and uniformly, and one with unevenly
shared k/v heads whose written k/v head counts are checked (scripts/llamacpp_tiny.py). With --bench,
llama-bench measures prompt processing and generation tokens/s at --threads threads.

    python scripts/llamacpp_check.py --bin .llamacpp/build/bin dense=smollm2 pl50=runs/gguf/pl50 \
        [--tiny] [--bench] [--json bench/results/llamacpp.json]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf as gguf_py
import numpy as np
import torch

from loraprune.pipeline.gguf_export import export_gguf
from loraprune.pipeline.llamacpp_tools import QUANTIZED, TOOLS_ENV
from loraprune.pipeline.load import load_config, load_model

PROMPT = "the company said it expects"


def run_llamacpp(binary: Path, gguf: Path, prompt: str, n_gen: int, threads: int, work: Path, mode: str) -> dict:
    """lp-logits's tokens, logits and greedy continuation; mode "exact" (float32 KV cache, no flash
    attention) or "defaults" (llama.cpp's own settings)."""
    logits_file = work / f"{gguf.stem}.logits.bin"
    out = subprocess.run(
        [str(binary), str(gguf), prompt, str(n_gen), str(logits_file), str(threads), mode],
        capture_output=True, text=True, errors="replace", check=True,
    )  # fmt: skip
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if line.startswith(("tokens:", "greedy:")))
    tokens = [int(t) for t in lines["tokens"].split()]
    logits = np.fromfile(logits_file, dtype=np.float32).reshape(len(tokens), -1)
    return {
        "tokens": tokens,
        "greedy": [int(t) for t in lines["greedy"].split()],
        "text": out.stdout.split("\ntext: ", 1)[1].split("\ncpu: ")[0].removesuffix("\n"),
        "logits": logits,
    }


def written_kv_heads(gguf: Path) -> list[int]:
    """The k/v heads per layer as the GGUF file declares them (what llama.cpp's loader sizes k/v by)."""
    fields = gguf_py.GGUFReader(gguf).fields
    arch = fields["general.architecture"].contents()
    kv = fields[f"{arch}.attention.head_count_kv"].contents()
    return kv if isinstance(kv, list) else [kv] * fields[f"{arch}.block_count"].contents()


class GgmlGelu(torch.nn.Module):
    """GELU (tanh form) as llama.cpp's CPU backend computes it: from a table over float16 inputs, the
    result rounded to float16 (ggml-cpu/vec.h, GGML_GELU_FP16), exact beyond |x| >= 10. Gemma's
    reference logits use it, so that the comparison checks the file, not that rounding (~5e-4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def computes_table_gelu(config) -> bool:
    """Whether llama.cpp runs this model's MLP with ggml's float16 GELU table (Gemma's tanh GELU)."""
    return getattr(config, "hidden_activation", None) == "gelu_pytorch_tanh"


def check(label: str, source: str, bin_dir: Path, work: Path, args, kv_heads: list[int] | None = None) -> dict:
    """`kv_heads`: the k/v heads per layer the file must declare (None: not checked)."""
    gguf = work / f"{label}.{args.outtype}.gguf"
    exported = export_gguf(source, gguf, args.outtype, overwrite=True)
    ours = run_llamacpp(bin_dir / "lp-logits", gguf, args.prompt, args.n_gen, args.threads, work, "exact")
    defaults = run_llamacpp(bin_dir / "lp-logits", gguf, args.prompt, args.n_gen, args.threads, work, "defaults")
    model, tokenizer = load_model(source)
    if computes_table_gelu(model.config):
        for mlp in (m for m in model.modules() if hasattr(m, "act_fn")):
            mlp.act_fn = GgmlGelu()
    hf_tokens = tokenizer(args.prompt)["input_ids"]
    ids = torch.tensor([ours["tokens"]])  # compare logits on llama.cpp's tokens
    with torch.no_grad():
        reference = model(ids).logits[0].numpy()
        generated = model.generate(
            ids, max_new_tokens=args.n_gen, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0, ids.shape[1] :].tolist()
    diff = float(np.abs(ours["logits"][:, : reference.shape[1]] - reference).max())
    scale = float(np.abs(reference).max())
    # transformers stops at an end-of-sequence token, lp-logits goes on: compare what both generated
    ours["greedy"], defaults["greedy"] = ours["greedy"][: len(generated)], defaults["greedy"][: len(generated)]
    same = next((i for i, (a, b) in enumerate(zip(ours["greedy"], generated, strict=False)) if a != b), None)
    result = {
        "model": source,
        "gguf_architecture": exported["architecture"],
        "gguf_bytes": exported["bytes"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": exported["layers"],
        "repeated_kv_heads": exported["repeated_kv_heads"],
        "kv_heads_written": written_kv_heads(gguf),
        "kv_heads_expected": kv_heads,
        "tokens_match_transformers": ours["tokens"] == hf_tokens,
        "logits_max_abs_diff": diff,
        "logit_scale": scale,
        "logits_max_abs_diff_relative": diff / scale,
        "logits_max_abs_diff_llamacpp_defaults": float(
            np.abs(defaults["logits"][:, : reference.shape[1]] - reference).max()
        ),
        "greedy_tokens_equal_llamacpp_defaults": defaults["greedy"] == generated,
        "greedy_llamacpp": ours["text"],
        "greedy_transformers": tokenizer.decode(generated, skip_special_tokens=True),
        "greedy_first_difference": same,
        "greedy_tokens_equal": ours["greedy"] == generated,
    }
    kv = "" if kv_heads is None else f" | k/v heads {result['kv_heads_written']} (expected {kv_heads})"
    print(
        f"{label:9s} {exported['architecture']:5s} tokens {'=' if result['tokens_match_transformers'] else '!='} "
        f"| max|Δlogit| {diff:.2e} ({diff / scale:.1e} of max|logit| {scale:.1f}; llama.cpp defaults "
        f"{result['logits_max_abs_diff_llamacpp_defaults']:.1e}) | greedy "
        f"{'identical' if same is None else f'differs from token {same}'}: {ours['text']!r}{kv}",
        flush=True,
    )
    return result


def bench(bin_dir: Path, ggufs: dict[str, Path], threads: int, prompt: int, gen: int, rounds: int) -> dict:
    """llama-bench tokens/s: the models take turns, one repetition each per round, so that load from
    other work falls on all of them alike; the best round is reported (the least disturbed), with
    the median beside it."""
    runs: dict[str, dict[str, list[float]]] = {label: {} for label in ggufs}
    for _ in range(rounds):
        for label, path in ggufs.items():
            out = subprocess.run(
                [str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(threads), "-p", str(prompt),
                 "-n", str(gen), "-r", "1", "-o", "json"],
                capture_output=True, text=True, errors="replace", check=True,
            )  # fmt: skip
            for row in json.loads(out.stdout):
                test = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
                runs[label].setdefault(test, []).append(row["avg_ts"])
    return {
        label: {
            test: {"tokens_per_s_best": max(values), "tokens_per_s_median": float(np.median(values)), "runs": values}
            for test, values in tests.items()
        }
        for label, tests in runs.items()
    }


def cpu_time(bin_dir: Path, ggufs: dict[str, Path], work: Path, gen: int, rounds: int) -> dict:
    """Tokens per CPU second at 1 thread (lp-logits "time" mode: llama.cpp's default settings),
    for a machine too busy for llama-bench's wall-clock rates: CPU time counts only this process's
    own work. The models take turns; the best round is reported."""
    prompt = " ".join(["the company said it expects to sell its shares at a lower price"] * 10)
    runs: dict[str, dict[str, list[float]]] = {label: {"pp": [], "tg": []} for label in ggufs}
    for _ in range(rounds):
        for label, path in ggufs.items():
            out = subprocess.run(
                [str(bin_dir / "lp-logits"), str(path), prompt, str(gen), str(work / "timing.bin"), "1", "time"],
                capture_output=True, text=True, errors="replace", check=True,
            )  # fmt: skip
            n_prompt, prompt_s, n_gen, gen_s = next(
                line.split()[1:] for line in out.stdout.splitlines() if line.startswith("cpu:")
            )
            runs[label]["pp"].append(int(n_prompt) / float(prompt_s))
            runs[label]["tg"].append(int(n_gen) / float(gen_s))
            runs[label]["tokens"] = [int(n_prompt), int(n_gen)]
    return {
        label: {
            "prompt_tokens": r["tokens"][0],
            "generated_tokens": r["tokens"][1],
            **{f"{test}_tokens_per_cpu_s_best": max(r[test]) for test in ("pp", "tg")},
            **{f"{test}_runs": r[test] for test in ("pp", "tg")},
        }
        for label, r in runs.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="LABEL=MODEL: a loraprune output folder, 'smollm2', ...")
    parser.add_argument("--bin", default=".llamacpp/build/bin", help="llama.cpp binaries (scripts/llamacpp/build.sh)")
    parser.add_argument("--work", default="runs/gguf", help="where the GGUF files are written")
    parser.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", *QUANTIZED),
                        help="quantized types: llama-quantize from --bin")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="also the tiny models of scripts/llamacpp_tiny.py")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--n-gen", type=int, default=20, help="greedy tokens to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bench", action="store_true", help="also llama-bench tokens/s")
    parser.add_argument("--bench-prompt", type=int, default=128)
    parser.add_argument("--bench-gen", type=int, default=64)
    parser.add_argument("--bench-rounds", type=int, default=5, help="turns each model takes (best is reported)")
    parser.add_argument("--bench-only", action="store_true", help="only llama-bench the GGUF files already in --work")
    parser.add_argument("--cpu-time", action="store_true", help="tokens per CPU second at 1 thread (busy machine)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |Δlogit| / max |logit| to pass")
    # the tiny float32 models agree to ~3e-7; a q or k bias left out moves their logits by ~3e-4
    parser.add_argument("--tiny-tolerance", type=float, default=1e-5, help="--tolerance of the --tiny models")
    # with GgmlGelu in the reference, Gemma's tiny models agree to ~1e-4: float32 tanh differs by an
    # ulp between torch and ggml, which moves some GELU outputs by one float16 step
    parser.add_argument("--tiny-gelu-tolerance", type=float, default=3e-4, help="--tolerance of tiny GELU models")
    args = parser.parse_args(argv)
    if not args.models and not args.tiny:
        parser.error("give LABEL=MODEL arguments, --tiny or both")
    torch.set_num_threads(args.threads)
    bin_dir, work = Path(args.bin), Path(args.work)
    os.environ.setdefault(TOOLS_ENV, str(bin_dir))  # export's llama-quantize
    work.mkdir(parents=True, exist_ok=True)
    results, started = {}, time.time()
    # label -> (model, k/v heads per layer expected in the file or None, tolerance)
    models = {label: (source, None, args.tolerance) for label, _, source in (s.partition("=") for s in args.models)}
    if args.tiny:
        from llamacpp_tiny import build  # next to this script

        tiny = build(work / "tiny")
        for label, (folder, kv) in tiny.items():
            gelu = computes_table_gelu(load_config(str(folder)))
            models[label] = (str(folder), kv, args.tiny_gelu_tolerance if gelu else args.tiny_tolerance)
    for label, (source, kv_heads, tolerance) in models.items():
        only_speed = args.bench_only or (args.cpu_time and not args.bench)
        results[label] = {"model": source} if only_speed else check(label, source, bin_dir, work, args, kv_heads)
        results[label]["tolerance"] = tolerance
    if args.bench or args.bench_only:
        print(f"llama-bench at {args.threads} threads; load average {os.getloadavg()[0]:.1f}", flush=True)
        ggufs = {label: work / f"{label}.{args.outtype}.gguf" for label in results}
        speeds = bench(bin_dir, ggufs, args.threads, args.bench_prompt, args.bench_gen, args.bench_rounds)
        for label, speed in speeds.items():
            results[label]["llama_bench"] = speed
            rates = (
                f"{test} {s['tokens_per_s_best']:7.1f} tok/s (median {s['tokens_per_s_median']:.1f})"
                for test, s in speed.items()
            )
            print(f"{label:8s} " + "  ".join(rates))
    if args.cpu_time:
        ggufs = {label: work / f"{label}.{args.outtype}.gguf" for label in results}
        for label, speed in cpu_time(bin_dir, ggufs, work, args.bench_gen, args.bench_rounds).items():
            results[label]["cpu_time_1_thread"] = speed
            pp, tg = speed["pp_tokens_per_cpu_s_best"], speed["tg_tokens_per_cpu_s_best"]
            print(
                f"{label:8s} pp{speed['prompt_tokens']} {pp:7.1f} tok/CPU-s  "
                f"tg{speed['generated_tokens']} {tg:6.1f} tok/CPU-s"
            )
    failed = [
        label
        for label, r in results.items()
        if r.get("logits_max_abs_diff_relative", 0) > r["tolerance"]
        or r.get("kv_heads_expected") not in (None, r.get("kv_heads_written"))
    ]
    if args.json:
        record = {
            "prompt": args.prompt,
            "outtype": args.outtype,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_average_1_5_15_min": os.getloadavg(),  # other work on the machine slows llama-bench
            "seconds": round(time.time() - started, 1),
            "tolerance": args.tolerance,
            "models": results,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if failed:
        print(
            f"llama.cpp and transformers disagree beyond the tolerance, or k/v heads differ from the expected, "
            f"for: {', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
