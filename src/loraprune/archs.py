"""What each model family looks like to the pruner: data, one entry per family.

Adding a family is one entry here plus one row in tests/tiny.py (FAMILIES), which every
masked-vs-pruned and export test then runs on. Biases need no entry:
shrinking slices whatever bias a projection has (qwen2's q/k/v biases included).
Paths are dotted and relative ('self.query'); '' is the module itself (BERT's MLP is the layer).
Encoders (BERT, ViT) have the same two groups as decoders: heads (q, k, v rows + o columns) and
MLP channels (up rows + down columns).
"""

import re
from dataclasses import dataclass

from torch import nn

from .errors import LoraPruneError


@dataclass(frozen=True)
class Arch:
    """Module names (relative paths), config keys and task of one model family."""

    layers: str = "model.layers"  # path from the top model (or its base model) to the list of layers
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
    # config key the family's own code reads the head size from; None: it derives hidden / heads,
    # so a stock config cannot say "fewer heads of the same size" (BERT) and pruned heads need a layout
    head_dim_key: str | None = "head_dim"
    # module attributes that hold sizes, reset after shrinking: (path in a layer, attribute, what), what
    # being 'heads' (kept heads), 'head_rows' (kept heads × head_dim) or 'channels' (kept MLP channels)
    size_attributes: tuple[tuple[str, str, str], ...] = ()
    task: str = "causal-lm"  # default task (tasks.TASKS), overridable with --task

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

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        """The list of layers: at `layers` from the model, or from its base model (a ViT classifier
        keeps them in `vit.layers`, a bare ViTModel in `layers`)."""
        try:
            return get_path(model, self.layers)
        except AttributeError:
            base = getattr(model, "base_model", None)
            if base is None or base is model:
                raise
            return get_path(base, self.layers)

    @property
    def lora_targets(self) -> str:
        """Every projection the method puts LoRA on (q, k, v, o, gate, up, down), as the regex peft's
        `target_modules` fullmatches against module names. Anchored at the layer index, so that
        BERT's two `output.dense` (attention output, MLP output) and any `dense` outside the layers
        (pooler, heads) are told apart."""

        def one_of(base: str, names) -> str:
            names = "|".join(re.escape(name) for name in names if name)
            return (re.escape(base) + r"\." if base else "") + f"(?:{names})"

        attention = one_of(self.attention, (self.q, self.k, self.v, self.o))
        mlp = one_of(self.mlp, (self.gate, self.up, self.down))
        return rf"(?:.*\.)?{re.escape(self.layers)}\.\d+\.(?:{attention}|{mlp})"


# the decoders' MLP keeps its own copy of the width (LlamaMLP.intermediate_size)
DECODER_SIZES = (("mlp", "intermediate_size", "channels"),)

ARCHS: dict[str, Arch] = {
    "llama": Arch(size_attributes=DECODER_SIZES),
    "mistral": Arch(size_attributes=DECODER_SIZES),
    "qwen2": Arch(size_attributes=DECODER_SIZES),  # q/k/v carry biases; sliced with their rows
    # BertModel (sentence embeddings, e.g. all-MiniLM-L6-v2): the MLP lives in the layer itself
    "bert": Arch(
        layers="encoder.layer",
        attention="attention",
        q="self.query",
        k="self.key",
        v="self.value",
        o="output.dense",
        mlp="",
        gate=None,
        up="intermediate.dense",
        down="output.dense",
        head_dim_key=None,  # BertSelfAttention: attention_head_size = hidden_size / num_attention_heads
        size_attributes=(
            ("attention.self", "num_attention_heads", "heads"),
            ("attention.self", "all_head_size", "head_rows"),
        ),
        task="embedding",
    ),
    # ViTModel / ViTForImageClassification (transformers 5.24 naming: vit.layers.N.attention.q_proj, mlp.fc1);
    # head_dim is read from the config
    "vit": Arch(
        layers="layers",
        attention="attention",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o="o_proj",
        mlp="mlp",
        gate=None,
        up="fc1",
        down="fc2",
        size_attributes=(("attention", "num_attention_heads", "heads"),),
        task="image-classification",
    ),
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
