"""llama.cpp's own tools, where a step is theirs to do: llama-quantize makes the quantized GGUF files
users deploy (`export --outtype q4_k_m`). Found in $LORAPRUNE_LLAMACPP (a folder of binaries; `make
llamacpp` builds them into .llamacpp/build/bin) or on PATH."""

import os
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import LoraPruneError

TOOLS_ENV = "LORAPRUNE_LLAMACPP"
# the quantizations users deploy, made by llama-quantize from an f16 GGUF (its mixes: q4_k_m keeps some
# tensors at q6_k), and the type name it takes
QUANTIZED = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M"}
# llama-quantize's line for a tensor whose rows its type cannot block (llama-quant.cpp)
_FALLBACK = re.compile(
    r"tensor cols (\d+) x (\d+) are not divisible by (\d+), required for (\S+) - using fallback quantization (\S+)"
)


def llama_tool(name: str) -> Path:
    """The path of llama.cpp's `name` binary; one clear error naming how to get it when it is missing."""
    folder = os.environ.get(TOOLS_ENV)
    found = Path(folder) / name if folder else shutil.which(name)
    if found is None or not Path(found).is_file():
        where = f"{TOOLS_ENV}={folder} has no {name}" if folder else f"{name} is not on PATH"
        raise LoraPruneError(
            f"this needs llama.cpp's {name} ({where}): run `make llamacpp` and set {TOOLS_ENV}=.llamacpp/build/bin"
        )
    return Path(found)


def quantize(source: Path, output: Path, kind: str, threads: int | None = None) -> list[str]:
    """Quantize the GGUF `source` into `output` as llama.cpp type `kind` (e.g. Q4_K_M) with
    llama-quantize; returns a warning per tensor it had to write in a fallback type."""
    tool = llama_tool("llama-quantize")
    argv = [str(tool), str(source), str(output), kind, *([str(threads)] if threads else [])]
    done = subprocess.run(argv, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        last = next((line for line in reversed(log.splitlines()) if line.strip()), "no output")
        raise LoraPruneError(f"llama-quantize failed ({done.returncode}): {last.strip()}")
    return [
        f"llama-quantize wrote a tensor of {cols} columns as {fallback}: {need} needs rows in blocks of {block}; "
        f"prune with --multiple-of {block} to avoid it"
        for cols, _, block, need, fallback in _FALLBACK.findall(log)
    ]
