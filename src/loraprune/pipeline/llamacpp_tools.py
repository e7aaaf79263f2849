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
# llama-quantize's warning for a tensor whose rows its type cannot block (llama-quant.cpp, tensor_type_fallback)
_FALLBACK = re.compile(
    r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\) "
    r"(?:\(WARNING: must use F16 due to unusual shape\) )?-> falling back to\s+(\S+)"
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
    return fallback_warnings(log)


def fallback_warnings(log: str) -> list[str]:
    """One line per (type wanted, type written) of llama-quantize's fallback tensors, and how to avoid
    those of the MLP width (the hidden size's are the model's own: the dense model has them too)."""
    groups: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for name, cols, block, wanted, written in _FALLBACK.findall(log):
        groups.setdefault((wanted, written, block), []).append((name, cols))
    lines = []
    for (wanted, written, block), tensors in groups.items():
        widths = sorted({int(cols) for _, cols in tensors})
        line = (f"llama-quantize wrote {len(tensors)} tensor(s) as {written}, not {wanted} (rows in blocks of "
                f"{block}; columns {', '.join(map(str, widths))}), e.g. {tensors[0][0]}")  # fmt: skip
        if any(".ffn_down." in name for name, _ in tensors):
            line += f"; prune with --multiple-of {block} to give the MLP widths whole blocks"
        lines.append(line)
    return lines
