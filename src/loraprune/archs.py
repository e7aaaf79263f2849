"""What each model family looks like to the pruner: data, one entry per family.

Adding a family is one entry here plus one row in tests/tiny.py (FAMILIES), which every
masked-vs-pruned and export test then runs on. Biases need no entry:
shrinking slices whatever bias a projection has (qwen2's q/k/v biases included).
"""

from dataclasses import dataclass

from torch import nn

from .errors import LoraPruneError


@dataclass(frozen=True)
class Arch:
    """Module names (relative paths) and config keys of one decoder family."""

    layers: str = "model.layers"  # path from the top model to the list of decoder layers
    attention: str = "self_attn"  # attention module inside a layer
    q: str = "q_proj"  # row-pruned: one block of head_dim rows per query head
    k: str = "k_proj"  # row-pruned: one block of head_dim rows per key/value head
    v: str = "v_proj"
    o: str = "o_proj"  # column-pruned: one block of head_dim input columns per query head
    mlp: str = "mlp"  # feed-forward module inside a layer
    gate: str | None = "gate_proj"  # row-pruned per channel (None for a plain fc1/fc2 MLP)
    up: str = "up_proj"  # row-pruned per channel
    down: str = "down_proj"  # column-pruned per channel
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    intermediate_key: str = "intermediate_size"

    @property
    def row_pruned_attention(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)

    @property
    def row_pruned_mlp(self) -> tuple[str, ...]:
        return tuple(name for name in (self.gate, self.up) if name)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return get_path(layer, self.attention)

    def projections(self, layer: nn.Module) -> dict[str, nn.Module]:
        """A layer's prunable projections by role: q, k, v, o, gate (if any), up, down."""
        attention, mlp = get_path(layer, self.attention), get_path(layer, self.mlp)
        found = {role: get_path(attention, getattr(self, role)) for role in ("q", "k", "v", "o")}
        found.update(
            {role: get_path(mlp, getattr(self, role)) for role in ("gate", "up", "down") if getattr(self, role)}
        )
        return found

    @property
    def lora_targets(self) -> list[str]:
        """Every projection the method puts LoRA on (q, k, v, o, gate, up, down)."""
        return [*self.row_pruned_attention, self.o, *self.row_pruned_mlp, self.down]


ARCHS: dict[str, Arch] = {
    "llama": Arch(),
    "mistral": Arch(),
    "qwen2": Arch(),  # q/k/v carry biases; sliced with their rows
}


def arch_for(config) -> Arch:
    """The table entry for a transformers config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        supported = ", ".join(sorted(ARCHS))
        raise LoraPruneError(f"unsupported architecture {model_type!r}; supported: {supported}")
    return ARCHS[model_type]


def get_path(root, path: str):
    """Follow a dotted attribute path ('model.layers') from a module; '' is the module itself."""
    for part in filter(None, path.split(".")):
        root = getattr(root, part)
    return root
