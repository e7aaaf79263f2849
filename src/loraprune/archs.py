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

# per task (tasks/): the transformers Auto class that holds its model, and what preprocesses the
# model's inputs ("tokenizer" for text, "image" for an image processor)
TASK_MODELS: dict[str, tuple[str, str]] = {
    "causal-lm": ("AutoModelForCausalLM", "tokenizer"),
    "embedding": ("AutoModel", "tokenizer"),
    "image-classification": ("AutoModelForImageClassification", "image"),
}

ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "gate_up", "down")


@dataclass(frozen=True)
class Arch:
    """Module names (relative paths), config keys and task of one model family."""

    layers: str = "model.layers"  # path from the top model (or its base model) to the list of layers
    attention: str = "self_attn"  # attention module inside a layer
    q: str | None = "q_proj"  # row-pruned: one block of head_dim rows per query head
    k: str | None = "k_proj"  # row-pruned: one block of head_dim rows per key/value head
    v: str | None = "v_proj"
    # one fused projection whose rows are [q heads | k heads | v heads] (Phi-3); q, k, v are then None
    qkv: str | None = None
    o: str = "o_proj"  # column-pruned: one block of head_dim input columns per query head
    mlp: str = "mlp"  # feed-forward module inside a layer
    gate: str | None = "gate_proj"  # row-pruned per channel (None for a plain fc1/fc2 MLP)
    up: str | None = "up_proj"  # row-pruned per channel
    # one fused projection whose rows are [gate channels | up channels] (Phi-3); gate, up are then None
    gate_up: str | None = None
    down: str = "down_proj"  # column-pruned per channel
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    intermediate_key: str = "intermediate_size"
    # config key the family's own code reads the head size from; None: it derives hidden / heads,
    # so a stock config cannot say "fewer heads of the same size" (BERT) and pruned heads need a layout
    head_dim_key: str | None = "head_dim"
    # module attributes that hold sizes, reset after shrinking: (path in a layer, attribute, what), what
    # being 'heads' (kept heads), 'kv_heads', 'head_rows' (kept heads × head_dim) or 'channels' (kept
    # MLP channels); an attribute 'config.NAME' gives that module its own view of the config with NAME
    # changed (for code that reads a size from the config in forward, like Phi-3's qkv split)
    size_attributes: tuple[tuple[str, str, str], ...] = ()
    # what a hidden-size cut must keep (pipeline/hidden.py): whether the embedding's output is
    # multiplied by sqrt(hidden_size), the norms (paths in a layer) applied to a sublayer's output
    # before it joins the residual stream, and the offset of the RMS norms' gain (offset + weight)
    scaled_embedding: bool = False
    output_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0
    task: str = "causal-lm"  # default task (tasks.TASKS), overridable with --task

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return get_path(layer, self.attention)

    def projections(self, layer: nn.Module) -> dict[str, nn.Module]:
        """A layer's prunable projections by role, each module once: q, k, v (or qkv), o, gate (if
        any) and up (or gate_up), down."""
        attention, mlp = get_path(layer, self.attention), get_path(layer, self.mlp)
        found = {role: get_path(attention, getattr(self, role)) for role in ATTENTION_ROLES if getattr(self, role)}
        found.update({role: get_path(mlp, getattr(self, role)) for role in MLP_ROLES if getattr(self, role)})
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

        attention = one_of(self.attention, [getattr(self, role) for role in ATTENTION_ROLES])
        mlp = one_of(self.mlp, [getattr(self, role) for role in MLP_ROLES])
        return rf"(?:.*\.)?{re.escape(self.layers)}\.\d+\.(?:{attention}|{mlp})"


# the decoders' MLP keeps its own copy of the width (LlamaMLP.intermediate_size)
DECODER_SIZES = (("mlp", "intermediate_size", "channels"),)

# its norms multiply by (1 + weight), and `post_attention_layernorm` normalises the attention's output
GEMMA = Arch(
    size_attributes=DECODER_SIZES,
    scaled_embedding=True,
    output_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    norm_offset=1.0,
)

ARCHS: dict[str, Arch] = {
    "llama": Arch(size_attributes=DECODER_SIZES),
    "mistral": Arch(size_attributes=DECODER_SIZES),
    "qwen2": Arch(size_attributes=DECODER_SIZES),  # q/k/v carry biases; sliced with their rows
    # q/k RMSNorm per head, of head_dim and shared by every head: pruning leaves it unchanged
    "qwen3": Arch(size_attributes=DECODER_SIZES),
    # embedding scale, pre/post feed-forward norms, logit soft-capping, sliding-window layers and a
    # head_dim of its own: all outside the pruned rows/columns, or per head
    "gemma2": GEMMA,
    # as gemma2, plus per-head q/k norms (Gemma3ForCausalLM, e.g. Gemma 3 1B)
    "gemma3_text": GEMMA,
    # fused projections: a head's q, k, v rows and a channel's gate and up rows are row ranges of
    # one matrix each; the attention splits qkv by config.num_attention_heads and its own
    # num_key_value_heads, so both are reset per layer (Phi3MLP keeps no width of its own)
    "phi3": Arch(
        q=None,
        k=None,
        v=None,
        qkv="qkv_proj",
        gate=None,
        up=None,
        gate_up="gate_up_proj",
        size_attributes=(
            ("self_attn", "num_key_value_heads", "kv_heads"),
            ("self_attn", "config.num_attention_heads", "heads"),
        ),
    ),
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


# families that structured pruning cannot handle correctly (yet): model type -> why, in one line
_WHOLE_WIDTH_QK_NORM = (
    "its q/k RMSNorm normalises over all heads together (width heads × head_dim), so removing a head "
    "would change how every other head is normalised"
)
REFUSED: dict[str, str] = {
    "olmo2": _WHOLE_WIDTH_QK_NORM,
    "olmo3": _WHOLE_WIDTH_QK_NORM,
    "flex_olmo": _WHOLE_WIDTH_QK_NORM,
    "gemma3": "this is the multimodal Gemma 3 (Gemma3ForConditionalGeneration); only the text-only "
    "gemma3_text models (Gemma3ForCausalLM, e.g. Gemma 3 1B) are supported",
}


def arch_for(config) -> Arch:
    """The table entry for a transformers config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise LoraPruneError(f"cannot prune {model_type!r} models: {REFUSED[model_type]}")
    if model_type not in ARCHS:
        supported = ", ".join(sorted(ARCHS))
        raise LoraPruneError(f"unsupported architecture {model_type!r}; supported: {supported}")
    return ARCHS[model_type]


def task_name(model_config, task: str | None = None) -> str:
    """`task`, or the default task of the model's family."""
    return task or arch_for(model_config).task


def auto_class_for(model_config, task: str | None = None) -> type:
    """The transformers Auto class that builds/loads a model of this config for `task` (default: the family's)."""
    import transformers

    return getattr(transformers, TASK_MODELS[task_name(model_config, task)][0])


def meta_model(model_config, task: str | None = None) -> nn.Module:
    """The task's model of this config on the meta device: shapes and parameter counts, no weights."""
    import torch

    with torch.device("meta"):
        return auto_class_for(model_config, task).from_config(model_config)


def get_path(root, path: str):
    """Follow a dotted attribute path ('model.layers') from a module; '' is the module itself."""
    for part in filter(None, path.split(".")):
        root = getattr(root, part)
    return root
