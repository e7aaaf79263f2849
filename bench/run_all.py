"""Run all five benchmarks: `python -m bench.run_all --quick` (~10 min on 2 cores) or `--full`.

The model is loaded once and each benchmark works on copies of it (memory.py runs its own
subprocesses). Extra arguments (e.g. --model, --data, --threads) are passed to every script.
"""

import argparse
import sys
import time

from . import common, masks, memory, overhead, progressive, quality, speed

PRESETS = {
    "quick": {
        quality: "--steps 10 --batch-size 2 --prune-freq 2 --eval-windows 16",
        memory: "--batches 1x128,4x128 --steps 2",
        overhead: "--batch 2x128 --rounds 6 --warmup 1",
        speed: "--shapes 1x128,1x512,8x128 --rounds 5 --new-tokens 24 --gen-rounds 2 --prune-steps 4",
        masks: "--steps 10 --batch-size 1 --prune-freq 2",
        progressive: "--steps 20 --batch-size 2 --prune-freq 2 --eval-windows 16",
    },
    "full": {
        quality: "--steps 120 --batch-size 4 --prune-freq 10",
        memory: "--batches 1x128,4x128 --steps 3",
        overhead: "--batch 1x128,4x128 --rounds 12 --warmup 2 --criteria lora,gradient,sketch",
        speed: "--shapes 1x128,1x512,8x128 --rounds 9 --new-tokens 64 --gen-rounds 3 --prune-steps 10",
        masks: "--steps 120 --batch-size 4 --prune-freq 10",
        progressive: "--steps 120 --batch-size 4 --prune-freq 10",
    },
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--quick", action="store_const", const="quick", dest="preset")
    size.add_argument("--full", action="store_const", const="full", dest="preset")
    p.add_argument("--only", default="quality,memory,overhead,speed,masks,progressive", help="comma-separated subset")
    args, extra = p.parse_known_args(argv)
    only = set(args.only.split(","))
    model = tokenizer = None
    for module, preset in PRESETS[args.preset].items():
        name = module.NAME
        if name not in only:
            continue
        script_args = [*preset.split(), "--label", args.preset, *extra]
        if model is None and module not in (memory, progressive):  # those two run their own processes
            common.setup(module.arguments().parse_args(script_args))
            model, tokenizer = common.load(module.arguments().parse_args(script_args))
        started = time.perf_counter()
        print(f"== {name} {' '.join(script_args)}", flush=True)
        module.main(script_args, model, tokenizer)
        print(f"== {name} done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
