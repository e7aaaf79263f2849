"""Models whose layers each keep their own heads and MLP width (the pruned shapes): the decoder
families, BERT (AutoModel) and ViT (AutoModel, AutoModelForImageClassification).

This file is self-contained (torch and transformers only) because it is copied into every
per-layer output folder: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
runs it without loraprune installed. loraprune's shrink step uses the same functions on
in-memory models, so there is one definition of what a pruned layer is.

config.json carries the layout under "loraprune_layout":
    {"modules": {"layers": "model.layers", "attention": "self_attn", "q": "q_proj", ...},
     (Phi-3: "qkv": "qkv_proj", "gate_up": "gate_up_proj", fused [q | k | v] and [gate | up] rows)
     "head_dim": 64,
     "layers": [{"kv_heads": 2, "kv_index": [0, 0, 1], "intermediate_size": 768}, ...]}
A layer keeps len(kv_index) query heads; query head i reads kept key/value head kv_index[i].
The family's own size fields (num_attention_heads, num_key_value_heads, intermediate_size) hold
the largest any layer keeps (heads: rounded up to a count the config class accepts), head_dim
is explicit; the layout is the per-layer truth.
Module paths are dotted and relative ('self.query'; '' is the layer itself); "size_attributes"
lists module attributes holding sizes ([path, attribute, 'heads' | 'head_rows' | 'channels']).
"""

import inspect

import torch
from torch import nn
from transformers import (
    BertModel,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    ViTForImageClassification,
    ViTModel,
)

LAYOUT_KEY = "loraprune_layout"


def is_grouped_evenly(kv_index: list[int], kv_heads: int) -> bool:
    """True when query heads read k/v heads in equal contiguous groups, as stock models assume."""
    if kv_heads == 0 or len(kv_index) % kv_heads:
        return False
    per_group = len(kv_index) // kv_heads
    return kv_index == [i // per_group for i in range(len(kv_index))]


class _GatheringCache:
    """Stands in for the KV cache during one attention call. After the real cache's update it
    repeats each kept k/v head once per query head that reads it, so layers whose query heads
    are unevenly shared run through the family's own attention code unchanged."""

    def __init__(self, cache, kv_index: list[int]):
        self.cache, self.kv_index = cache, kv_index

    def update(self, key, value, *args, **kwargs):
        if self.cache is not None:
            key, value = self.cache.update(key, value, *args, **kwargs)
        index = torch.tensor(self.kv_index, device=key.device)
        # (batch, kv_heads, seq, head_dim) -> (batch, heads, seq, head_dim)
        return key.index_select(1, index), value.index_select(1, index)

    def __getattr__(self, name):
        return getattr(self.cache, name)


_GATHERING_CLASSES: dict[type, type] = {}


def _gathering_class(base: type) -> type:
    if base in _GATHERING_CLASSES:
        return _GATHERING_CLASSES[base]
    # transformers 5 renamed past_key_values -> cache; pass it on under the name the base takes
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def forward(self, *args, **kwargs):
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        kwargs[cache_arg] = _GatheringCache(cache if cache is not None else legacy, self.kv_index)
        return base.forward(self, *args, **kwargs)

    cls = type(f"Gathering{base.__name__}", (base,), {"forward": forward})
    _GATHERING_CLASSES[base] = cls
    return cls


def set_kv_layout(attention: nn.Module, kv_index: list[int], kv_heads: int) -> None:
    """Tell an attention module which kept k/v head each kept query head reads."""
    base = next(c for c in type(attention).__mro__ if c not in _GATHERING_CLASSES.values())
    if is_grouped_evenly(kv_index, kv_heads):
        attention.__class__ = base
        attention.num_key_value_groups = len(kv_index) // kv_heads
        return
    attention.__class__ = _gathering_class(base)
    attention.num_key_value_groups = 1  # k/v arrive already repeated per query head
    # a plain list, not a buffer: loading materialises non-persistent buffers uninitialised
    attention.kv_index = list(kv_index)


def _get(root, path: str):
    for part in filter(None, path.split(".")):
        root = getattr(root, part)
    return root


def _set(root, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent), name, value)


class LayerConfig:
    """One module's view of the model config with some sizes changed (its layer's pruned sizes),
    for code that reads them from the config in forward (Phi-3 splits qkv by
    config.num_attention_heads). Everything else, _attn_implementation included, is read from the
    shared config at the time of the call."""

    def __init__(self, config, **sizes):
        self.__dict__.update(sizes, _config=config)

    def __getattr__(self, name):
        config = self.__dict__.get("_config")
        if config is None:  # copy/pickle probing a half-built instance
            raise AttributeError(name)
        return getattr(config, name)


def set_size_attributes(
    layer: nn.Module, size_attributes, heads: int, head_dim: int, channels: int, kv_heads: int | None = None
) -> None:
    """Reset the module attributes that hold a layer's sizes (e.g. BERT's num_attention_heads);
    'config.NAME' gives the module a LayerConfig with NAME changed."""
    sizes = {"heads": heads, "kv_heads": kv_heads, "head_rows": heads * head_dim, "channels": channels}
    for path, attribute, what in size_attributes:
        module = _get(layer, path)
        if attribute.startswith("config."):
            config = module.config
            shared = config.__dict__["_config"] if isinstance(config, LayerConfig) else config
            overrides = {k: v for k, v in vars(config).items() if k != "_config"} if config is not shared else {}
            module.config = LayerConfig(shared, **{**overrides, attribute[len("config.") :]: sizes[what]})
        else:
            setattr(module, attribute, sizes[what])


def _layers(model: nn.Module, path: str):
    try:
        return _get(model, path)
    except AttributeError:  # e.g. ViTForImageClassification keeps them in its base model
        return _get(model.base_model, path)


def _resized(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def resize_layers(model: nn.Module, layout: dict) -> None:
    """Give each layer the (empty) projections of its pruned shape, ready for loading weights."""
    names = layout["modules"]
    for layer, shape in zip(_layers(model, names["layers"]), layout["layers"], strict=True):
        attention = _get(layer, names["attention"])
        head_dim = layout.get("head_dim") or attention.head_dim
        heads, kv_rows = len(shape["kv_index"]) * head_dim, shape["kv_heads"] * head_dim
        mlp, width = _get(layer, names["mlp"]), shape["intermediate_size"]
        rows = (  # row-pruned projections (a fused one holds its parts' rows) and their kept rows
            (attention, names.get("qkv"), heads + 2 * kv_rows),
            (attention, names["q"], heads),
            (attention, names["k"], kv_rows),
            (attention, names["v"], kv_rows),
            (mlp, names.get("gate_up"), 2 * width),
            (mlp, names["gate"], width),
            (mlp, names["up"], width),
        )
        for parent, name, kept in rows:
            if name:
                old = _get(parent, name)
                _set(parent, name, _resized(old, old.in_features, kept))
        o = _get(attention, names["o"])
        _set(attention, names["o"], _resized(o, heads, o.out_features))
        down = _get(mlp, names["down"])
        _set(mlp, names["down"], _resized(down, width, down.out_features))
        set_kv_layout(attention, shape["kv_index"], shape["kv_heads"])
        sizes = names.get("size_attributes", ())
        set_size_attributes(layer, sizes, len(shape["kv_index"]), head_dim, width, shape["kv_heads"])


def _pruned_class(base: type) -> type:
    def __init__(self, config):
        base.__init__(self, config)
        resize_layers(self, getattr(config, LAYOUT_KEY))

    def _get_static_cache_init_shape(self):
        # a static KV cache allocated up front (generate's prefill_chunk_size): each layer's own
        # k/v heads, which is what reaches the cache (the gathering happens after it)
        # (only transformers versions that have this method call it)
        if base._get_static_cache_init_shape(self) is None:  # e.g. layers on several devices
            return None
        layout = getattr(self.config, LAYOUT_KEY)
        return [shape["kv_heads"] for shape in layout["layers"]], layout["head_dim"]

    members = {"__init__": __init__, "_get_static_cache_init_shape": _get_static_cache_init_shape}
    return type(f"Pruned{base.__name__}", (base,), members)


# One class per supported family; config.json's auto_map names the right one.
PrunedLlamaForCausalLM = _pruned_class(LlamaForCausalLM)
PrunedMistralForCausalLM = _pruned_class(MistralForCausalLM)
PrunedQwen2ForCausalLM = _pruned_class(Qwen2ForCausalLM)
PrunedQwen3ForCausalLM = _pruned_class(Qwen3ForCausalLM)
PrunedGemma2ForCausalLM = _pruned_class(Gemma2ForCausalLM)
PrunedGemma3ForCausalLM = _pruned_class(Gemma3ForCausalLM)
PrunedPhi3ForCausalLM = _pruned_class(Phi3ForCausalLM)
PrunedBertModel = _pruned_class(BertModel)
PrunedViTModel = _pruned_class(ViTModel)
PrunedViTForImageClassification = _pruned_class(ViTForImageClassification)
