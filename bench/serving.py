"""Serving: the dense and pruned models where users run them, in llama.cpp, unquantized and quantized.

For each LABEL=MODEL (a loraprune output folder, 'smollm2', ...) and each --outtypes type, the GGUF
export (`loraprune export`; quantized types through llama.cpp's llama-quantize) is measured by
llama.cpp's own tools: `llama-bench` prompt processing (pp, --prompt tokens) and generation (tg,
--gen tokens) tokens/s at --threads threads, every file taking one turn per round (so other load on
the machine falls on all alike), medians of --rounds; and `llama-perplexity` on each --texts text's
test split (its protocol: the first --chunks chunks of --ctx tokens, the second half of each
scored). The limit of a speedup is the dense file's bytes over the pruned file's: generation reads
every weight once per token, and a prompt's matmuls scale with the same weights. Files already
exported are reused, so an interrupted run resumes.
"""

import json
import re
import statistics
import subprocess
from pathlib import Path

from . import common, publish

NAME = "serving"
_PPL = re.compile(r"Final estimate: PPL = (\S+) \+/- (\S+)")  # on stderr; 'inf' or 'nan' too
_RUNNING = re.compile(r"\[(\d+)\]([^,\s]+),")  # stdout's running estimate after each chunk
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks")


def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="LABEL=MODEL; the first is the reference (the dense model)")
    p.add_argument("--bin", default=".llamacpp/build/bin", help="llama.cpp's binaries (make llamacpp)")
    p.add_argument("--work", default="runs/serving", help="where the GGUF files and texts are written")
    p.add_argument("--outtypes", default="f16,q4_k_m")
    p.add_argument("--texts", default="ptb,pydoc", help="texts whose test split llama-perplexity reads")
    p.add_argument("--ctx", type=int, default=512, help="llama-perplexity's context (chunk) length")
    p.add_argument("--chunks", type=int, default=30, help="chunks llama-perplexity scores per text (-1: all)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bench-threads", type=int, default=2, help="llama.cpp's threads")
    return p


def export(model: str, path: Path, outtype: str) -> dict:
    from loraprune.pipeline.gguf_export import export_gguf

    if not path.exists():
        result = export_gguf(model, path, outtype)
        path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return json.loads(path.with_suffix(".json").read_text())


def perplexity(binary: Path, gguf: Path, text: Path, args, tries: int = 3) -> dict:
    """llama-perplexity's estimate after its last chunk, and its error when printed. Its log is
    written by a thread the tool does not join at exit, so the last lines are sometimes lost: the
    running estimate after the last chunk (stdout) stands for the final one (the same number, no
    error), and a run that lost both is repeated."""
    for _ in range(tries):
        done = subprocess.run(
            [str(binary), "-m", str(gguf), "-f", str(text), "-c", str(args.ctx), "-b", str(args.ctx),
             "--chunks", str(args.chunks), "-t", str(args.bench_threads)],
            capture_output=True, text=True, errors="replace",
        )  # fmt: skip
        if done.returncode:
            break
        chunks, final = _CHUNKS.search(done.stderr), _PPL.search(done.stderr)
        running = _RUNNING.findall(done.stdout)
        if chunks and running and running[-1][0] == chunks[1]:
            return {"perplexity": float(running[-1][1]), "error": float(final[2]) if final else None,
                    "chunks": int(chunks[1])}  # fmt: skip
    raise RuntimeError(f"llama-perplexity gave no estimate for {gguf} on {text}:\n{done.stderr[-2000:]}")


def bench_round(binary: Path, gguf: Path, args) -> dict[str, float]:
    done = subprocess.run(
        [str(binary), "-m", str(gguf), "-t", str(args.bench_threads), "-p", str(args.prompt), "-n", str(args.gen),
         "-r", "1", "-o", "json"],
        capture_output=True, text=True, errors="replace", check=True,
    )  # fmt: skip
    return {f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}": r["avg_ts"] for r in json.loads(done.stdout)}


def main(argv=None) -> dict:
    args = arguments().parse_args(argv)
    import os

    from loraprune.pipeline.llamacpp_tools import TOOLS_ENV
    from loraprune.pipeline.texts import load_text

    os.environ.setdefault(TOOLS_ENV, args.bin)
    work, binaries = Path(args.work), Path(args.bin)
    work.mkdir(parents=True, exist_ok=True)
    texts = {}
    for name in args.texts.split(","):
        texts[name] = work / f"{name}.test.txt"
        texts[name].write_text(load_text(name, "test"))
    models = dict(spec.split("=", 1) for spec in args.models)
    outtypes = args.outtypes.split(",")
    files = {(label, outtype): work / f"{label}.{outtype}.gguf" for label in models for outtype in outtypes}
    rows = {key: {"model": models[key[0]], "outtype": key[1], "export": export(models[key[0]], path, key[1])}
            for key, path in files.items()}  # fmt: skip
    for (label, outtype), row in rows.items():
        row["bytes"] = files[label, outtype].stat().st_size
        row["perplexity"] = {
            name: perplexity(binaries / "llama-perplexity", files[label, outtype], text, args)
            for name, text in texts.items()
        }
        print(f"[serving] {label} {outtype}: {row['bytes'] / 2**20:.0f} MiB, {row['perplexity']}", flush=True)
    speeds: dict[tuple[str, str], dict[str, list[float]]] = {key: {} for key in files}
    for _ in range(args.rounds):
        for key, path in files.items():
            for test, rate in bench_round(binaries / "llama-bench", path, args).items():
                speeds[key].setdefault(test, []).append(rate)
    for key, row in rows.items():
        row["tokens_per_s"] = {test: statistics.median(rates) for test, rates in speeds[key].items()}
        row["tokens_per_s_runs"] = speeds[key]
        print(f"[serving] {key[0]} {key[1]}: {row['tokens_per_s']}", flush=True)
    payload = {"rows": [{"label": label, **row} for (label, _), row in rows.items()], "reference": next(iter(models))}
    return publish.publish(args, argv, NAME, "llama.cpp: speed and perplexity of the exports", payload)


def section(payload: dict, page, results) -> str:
    """One run's table: each file's size, speeds against the dense file of the same type (and the
    limit its bytes set), and perplexities."""
    args, rows = payload["args"], payload["rows"]
    dense = {r["outtype"]: r for r in rows if r["label"] == payload["reference"]}
    texts = list(rows[0]["perplexity"])
    tests = list(rows[0]["tokens_per_s"])
    table = []
    for r in rows:
        base = dense[r["outtype"]]
        limit = base["bytes"] / r["bytes"]
        speedups = [r["tokens_per_s"][t] / base["tokens_per_s"][t] for t in tests]
        table.append([
            r["label"], r["outtype"], f"{r['bytes'] / 2**20:.0f}",
            *[f"{r['tokens_per_s'][t]:.1f}" for t in tests],
            *[f"{s:.2f}x ({s / limit:.0%})" if r is not base else "1" for s in speedups],
            *[r["perplexity"][t]["perplexity"] for t in texts],
            len(r["export"]["warnings"]),
        ])  # fmt: skip
    headers = ["model", "type", "MiB", *[f"{t} tok/s" for t in tests], *[f"{t} vs dense (of the bytes limit)"
               for t in tests], *[f"ppl {t}" for t in texts], "warnings"]  # fmt: skip
    models = "\n".join(f"- `{r['label']}`: {r['model']}" for r in rows if r["outtype"] == rows[0]["outtype"])
    return (
        f"llama.cpp at {args['bench_threads']} threads; tokens/s are medians of {args['rounds']} alternated rounds; "
        f"perplexity by llama-perplexity on the first {args['chunks']} {args['ctx']}-token chunks of each text's test "
        "split (the second half of each chunk scored). 'of the bytes limit': the speedup over the dense file's bytes "
        "/ this file's.\n\n"
        + common.table(headers, table)
        + f"\n\nModels:\n\n{models}\n\nCommand: `{payload['command']}`"
    )


if __name__ == "__main__":
    main()
