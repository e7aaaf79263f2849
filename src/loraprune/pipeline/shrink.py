"""Physical pruning (docs/method.md#masks-and-shrinking): cut the dead rows and columns out of W0 and the LoRA factors.

Works on plain and peft-wrapped projections alike: a LoRA layer keeps B's rows with its output
rows and A's columns with its input columns, so merging afterwards gives exactly the kept part
of W0 + s·B·A. The model config is then rebuilt from the weights' real shapes.
"""

import torch
from torch import Tensor, nn

from ..archs import Arch
from .groups import LayerGroups
from .modeling_pruned import LAYOUT_KEY, is_grouped_evenly, set_kv_layout, set_size_attributes

# (old parameter, new parameter, dim, kept index) of every parameter a shrink replaced: what an
# optimizer needs to carry its moments over (move_optimizer_state)
Moved = list[tuple[nn.Parameter, nn.Parameter, int, Tensor]]


def _keep(linear: nn.Linear, index: Tensor, dim: int, moved: Moved | None = None) -> None:
    """Keep output rows (dim 0) or input columns (dim 1) of a linear layer, in place."""
    weight = linear.weight
    index = index.to(weight.device)
    linear.weight = nn.Parameter(weight.index_select(dim, index), weight.requires_grad)
    if moved is not None:
        moved.append((weight, linear.weight, dim, index))
    if dim == 0:
        if linear.bias is not None:
            bias = linear.bias
            linear.bias = nn.Parameter(bias[index], bias.requires_grad)
            if moved is not None:
                moved.append((bias, linear.bias, 0, index))
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def keep_projection(module: nn.Module, index: Tensor, dim: int, moved: Moved | None = None) -> None:
    """Keep rows/columns of a projection; for a peft LoRA layer also of its B (rows) or A (columns)."""
    _keep(getattr(module, "base_layer", module), index, dim, moved)
    if hasattr(module, "lora_A"):
        factors = module.lora_B if dim == 0 else module.lora_A
        for linear in factors.values():
            _keep(linear, index, dim, moved)
        if dim == 0:
            module.out_features = len(index)
        else:
            module.in_features = len(index)


def scale_output(module: nn.Module, factor: float) -> None:
    """Multiply a projection's output by `factor`, in place: its weight and bias, and for a peft LoRA
    layer its B factors (the merged update scales with them)."""
    for linear in (getattr(module, "base_layer", module), *getattr(module, "lora_B", {}).values()):
        linear.weight.mul_(factor)
        if linear.bias is not None:
            linear.bias.mul_(factor)


def _rows(units: Tensor, size: int) -> Tensor:
    """Row indices of whole units of `size` rows: [1, 3] with size 2 -> [2, 3, 6, 7]."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def shrink_layer(
    layer: nn.Module,
    arch: Arch,
    head_dim: int,
    kv_of_head: Tensor,
    heads: Tensor,
    channels: Tensor,
    moved: Moved | None = None,
) -> dict:
    """Remove the heads and channels of one layer that `heads` and `channels` (bool, over the heads
    and channels the layer holds now) mark dead, in place; `kv_of_head`: the k/v head (position in
    the layer now) each of its query heads reads. Returns the layer's layout entry (set_layout).
    Works on a dense layer (the end-of-run shrink) and on one shrunk before (--shrink progressive)."""
    projections = arch.projections(layer)
    kept_heads = heads.nonzero().flatten()
    kept_kv = kv_of_head[kept_heads].unique()  # sorted
    kv_index = torch.searchsorted(kept_kv, kv_of_head[kept_heads])

    head_rows, kv_rows = _rows(kept_heads, head_dim), _rows(kept_kv, head_dim)
    kept_channels = channels.nonzero().flatten()
    kept = {"q": head_rows, "k": kv_rows, "v": kv_rows, "gate": kept_channels, "up": kept_channels}
    now = LayerGroups.held(kv_of_head, head_dim, len(channels))
    rows_of = {}  # projection -> its kept rows, in order (a fused one: each part's, offset)
    for role, (name, start, _) in now.row_parts(projections).items():
        rows_of.setdefault(name, []).append(kept[role] + start)
    for name, rows in rows_of.items():
        keep_projection(projections[name], torch.cat(rows), 0, moved)
    keep_projection(projections["o"], head_rows, 1, moved)
    keep_projection(projections["down"], kept_channels, 1, moved)
    set_kv_layout(arch.attention_module(layer), kv_index.tolist(), len(kept_kv))
    set_size_attributes(layer, arch.size_attributes, len(kept_heads), head_dim, len(kept_channels), len(kept_kv))
    return {"kv_heads": len(kept_kv), "kv_index": kv_index.tolist(), "intermediate_size": len(kept_channels)}


def shrink(model: nn.Module, arch: Arch, head_alive, channel_alive, kv_of_head: list[Tensor] | None = None) -> None:
    """Remove dead heads (per layer, bool over its heads) and channels in place and record the
    shapes in the config. `kv_of_head` (per layer): which k/v head each query head reads, for
    layers shrunk before; the dense layout when None."""
    groups = LayerGroups.from_config(model.config, arch)
    layers = arch.layers_of(model)
    kv_maps = kv_of_head if kv_of_head is not None else [groups.kv_of_head] * len(layers)
    layout = [
        shrink_layer(layer, arch, groups.head_dim, kv, heads, channels)
        for layer, kv, heads, channels in zip(layers, kv_maps, head_alive, channel_alive, strict=True)
    ]
    set_layout(model.config, arch, layout)


@torch.no_grad()
def move_optimizer_state(optimizer: torch.optim.Optimizer, moved: Moved) -> None:
    """Put the new parameters of a shrink in the optimizer in place of the old ones (same position),
    with their per-element state (AdamW's exp_avg, exp_avg_sq) sliced like the parameters; scalar
    state (step) is kept as it is."""
    replaced = {id(old): (new, dim, index) for old, new, dim, index in moved}
    for group in optimizer.param_groups:
        for position, old in enumerate(group["params"]):
            if id(old) not in replaced:
                continue
            new, dim, index = replaced[id(old)]
            group["params"][position] = new
            state = optimizer.state.pop(old, None)
            if state:
                optimizer.state[new] = {
                    key: value.index_select(dim, index.to(value.device))
                    if isinstance(value, Tensor) and value.shape == old.shape
                    else value
                    for key, value in state.items()
                }


def config_error(config, changes: dict) -> str | None:
    """Why the family's own config class rejects `config` with `changes` (its per-layer layout left
    out), or None if it accepts them."""
    values = config.to_dict()
    values.pop(LAYOUT_KEY, None)
    values.update(changes)
    try:
        type(config)(**values)
    except Exception as error:  # the config classes raise assorted types from their validators
        return str(error).strip().splitlines()[-1].strip()
    return None


def stock_config_error(
    config, arch: Arch, heads: int, kv_heads: int, channels: int, hidden: int | None = None
) -> str | None:
    """Why the family's config class rejects these uniform sizes (and `hidden` channels, when the
    hidden size is cut too), or None if it accepts them."""
    dense = LayerGroups.from_config(config, arch)
    if arch.head_dim_key is None and heads != dense.heads:
        return f"{type(config).__name__} derives the head size from hidden_size / {arch.heads_key}"
    changes = {arch.heads_key: heads, arch.kv_heads_key: kv_heads, arch.intermediate_key: channels}
    if hidden is not None:
        changes["hidden_size"] = hidden
    if arch.head_dim_key:
        changes[arch.head_dim_key] = dense.head_dim  # explicit: hidden/heads changes
    return config_error(config, changes)


def set_layout(config, arch: Arch, layout: list[dict]) -> None:
    """Record the per-layer shapes in the config: as the family's own fields when every layer
    is alike, evenly grouped and accepted by the config class; else as a per-layer layout."""
    first = layout[0]
    heads, kv_heads, channels = len(first["kv_index"]), first["kv_heads"], first["intermediate_size"]
    uniform = all(shape == first for shape in layout) and is_grouped_evenly(first["kv_index"], kv_heads)
    head_dim = LayerGroups.from_config(config, arch).head_dim
    if uniform and stock_config_error(config, arch, heads, kv_heads, channels) is None:
        if arch.head_dim_key:
            setattr(config, arch.head_dim_key, head_dim)
        setattr(config, arch.heads_key, heads)
        setattr(config, arch.kv_heads_key, kv_heads)
        setattr(config, arch.intermediate_key, channels)
        if hasattr(config, LAYOUT_KEY):
            delattr(config, LAYOUT_KEY)
        return
    _set_largest_sizes(config, arch, layout, head_dim)
    names = ("layers", "attention", "q", "k", "v", "qkv", "o", "mlp", "gate", "up", "gate_up", "down")
    modules = {name: getattr(arch, name) for name in names}
    if arch.size_attributes:
        modules["size_attributes"] = [list(entry) for entry in arch.size_attributes]
    setattr(config, LAYOUT_KEY, {"modules": modules, "head_dim": head_dim, "layers": layout})


def _set_largest_sizes(config, arch: Arch, layout: list[dict], head_dim: int) -> None:
    """Per-layer shapes: the family's own size fields become the largest any layer keeps, so that
    whatever reads config.json alone never sizes more than exists (the layout has each layer's own).
    Heads: the smallest count at least that large which the config class accepts (LlamaConfig wants
    one that divides hidden_size; BERT derives its head size from it and keeps its dense count)."""
    kv_heads = max(shape["kv_heads"] for shape in layout)
    channels = max(shape["intermediate_size"] for shape in layout)
    dense = getattr(config, arch.heads_key)
    largest = max(len(shape["kv_index"]) for shape in layout)
    accepted = (h for h in range(largest, dense + 1) if not stock_config_error(config, arch, h, kv_heads, channels))
    heads = next(accepted, dense)
    if arch.head_dim_key:
        setattr(config, arch.head_dim_key, head_dim)  # explicit: hidden / heads changes
    setattr(config, arch.heads_key, heads)
    if hasattr(config, arch.kv_heads_key):
        setattr(config, arch.kv_heads_key, kv_heads)
    setattr(config, arch.intermediate_key, channels)
