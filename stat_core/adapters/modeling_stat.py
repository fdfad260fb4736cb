"""Per-layer shapes for pruned models — the one file that also ships inside every exported folder.

Stock configs hold one head count and one MLP width for all layers; a STAT-pruned model has its
own per layer, recorded in ``config.stat_layer_shapes``. :func:`resize_to_layer_shapes_` turns a
freshly built stock model into one whose projections have those shapes, before the weights are
loaded into it. The export copies this file verbatim into the folder as ``modeling_stat.py`` (with
the base class filled in), so ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` works
with stock transformers and without ``stat_core``; ``stat_core.load_pruned`` imports the same code
from here. It must therefore import nothing but torch and transformers.
"""

from __future__ import annotations

from torch import nn

#: Where each family keeps its layers and projections, by ``model_type`` (paths relative to the base
#: model / a layer). In the library this is filled from the family records
#: (:data:`stat_core.adapters.registry.FAMILIES`, each record's ``layout``: the one place a family is
#: described); an exported copy of this file gets its model's one entry appended by the export.
LAYOUTS: dict[str, dict] = {}


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in filter(None, path.split(".")):  # "" is the module itself
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    *parents, name = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, name, value)


def is_conv1d(module: nn.Module) -> bool:
    """``transformers``' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _resized(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None,
             bias: bool | None = None) -> nn.Linear:
    """A fresh Linear (or Conv1D, for a Conv1D) of the new size, same dtype/device (and bias-ness
    unless ``bias`` says); its values are loaded later."""
    if is_conv1d(linear):  # always has a bias
        nx, nf = linear.weight.shape
        new = type(linear)(out_features or nf, in_features or nx)
        return new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    new = nn.Linear(in_features or linear.in_features, out_features or linear.out_features,
                    bias=(linear.bias is not None) if bias is None else bias, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    return new


def _layers(model: nn.Module, layout: dict) -> nn.ModuleList:
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    first = layout["layers"].split(".")[0]
    if not hasattr(base, first) and hasattr(base, "model"):  # one level deeper (e.g. a multimodal wrapper)
        base = base.model
    return _get(base, layout["layers"])


class LayerConfig:
    """The model's config as one layer's attention should see it: ``overrides`` (its own head
    count) on top of the shared config, which every other read and every write goes to (so a later
    ``set_attn_implementation`` still reaches this layer)."""

    def __init__(self, base, **overrides):
        object.__setattr__(self, "_stat_base", base)
        object.__setattr__(self, "_stat_overrides", overrides)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_stat_base", "_stat_overrides"):
            raise AttributeError(name)  # copy / pickle look these up before __dict__ is filled
        if name in self._stat_overrides:
            return self._stat_overrides[name]
        return getattr(self._stat_base, name)

    def __setattr__(self, name, value):
        if name in self._stat_overrides:
            self._stat_overrides[name] = value
        else:
            setattr(self._stat_base, name, value)


def head_dim_of(attn: nn.Module) -> int:
    """The head size an attention module records (``head_dim``; GPT-NeoX ``head_size``; BERT
    ``attention_head_size``)."""
    for name in ("head_dim", "head_size", "attention_head_size"):
        value = getattr(attn, name, None)
        if value:
            return int(value)
    raise AttributeError(f"{type(attn).__name__} records no head size")


def set_attention_counts(attn, n_heads: int, n_kv: int, head_dim: int, layout: dict | None = None) -> None:
    """Attention code reads these counts (GQA repeat factor, BERT's all_head_size, GPT-2's
    split_size, Phi-3's config); keep them true."""
    for name in ("num_heads", "num_attention_heads", "n_heads"):
        if hasattr(attn, name):
            setattr(attn, name, n_heads)
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = n_kv
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = n_heads // n_kv
    if hasattr(attn, "all_head_size"):
        attn.all_head_size = n_heads * head_dim
    if hasattr(attn, "split_size"):  # GPT-2: the width of each of q, k, v in c_attn
        attn.split_size = n_heads * head_dim
    if layout is not None and layout.get("attn_config_heads"):
        base = getattr(attn.config, "_stat_base", attn.config)
        attn.config = LayerConfig(base, num_attention_heads=n_heads)


def resize_to_layer_shapes_(model: nn.Module, shapes: list[dict]) -> None:
    """Give layer ``i`` the widths ``shapes[i]`` (``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size``); parameter values are left for the checkpoint to fill."""
    layout = LAYOUTS[model.config.model_type]
    layers = _layers(model, layout)
    if len(shapes) != len(layers):
        raise ValueError(f"config lists {len(shapes)} layer shapes for a model with {len(layers)} layers")
    for layer, shape in zip(layers, shapes):
        attn = _get(layer, layout["attn"])
        head_dim = head_dim_of(attn)
        n_heads, n_kv = int(shape["num_attention_heads"]), int(shape["num_key_value_heads"])
        n_ff = int(shape["intermediate_size"])
        if "qkv" in layout:  # fused: q, k and v rows in one projection, in whichever order
            _set(layer, layout["qkv"], _resized(_get(layer, layout["qkv"]),
                                                out_features=(n_heads + 2 * n_kv) * head_dim))
        else:
            _set(layer, layout["q"], _resized(_get(layer, layout["q"]), out_features=n_heads * head_dim))
            for key in ("k", "v"):
                _set(layer, layout[key], _resized(_get(layer, layout[key]), out_features=n_kv * head_dim))
        # A correction may have given output projections a bias the stock family lacks.
        _set(layer, layout["o"], _resized(_get(layer, layout["o"]), in_features=n_heads * head_dim,
                                          bias=shape.get("attn_out_bias")))
        for path in layout["w_in"]:
            _set(layer, path, _resized(_get(layer, path), out_features=layout.get("w_in_parts", 1) * n_ff))
        _set(layer, layout["w_out"], _resized(_get(layer, layout["w_out"]), in_features=n_ff,
                                              bias=shape.get("mlp_out_bias")))
        set_attention_counts(attn, n_heads, n_kv, head_dim, layout)
        mlp = _get(layer, layout["mlp"])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = n_ff


def pruned_class(base: type) -> type:
    """``base`` (a stock ``*For*`` class) whose layers take the shapes in ``config.stat_layer_shapes``."""

    class StatPruned(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            shapes = getattr(config, "stat_layer_shapes", None)
            if shapes:
                resize_to_layer_shapes_(self, shapes)
            if getattr(config, "stat_output_prior", False):  # a vocabulary bias on the output layer
                head = self.get_output_embeddings()
                head.bias = nn.Parameter(head.weight.new_zeros(head.out_features))

    StatPruned.__name__ = StatPruned.__qualname__ = f"StatPruned{base.__name__}"
    _share_checkpoint_renaming(base, StatPruned)
    return StatPruned


def _share_checkpoint_renaming(base: type, cls: type) -> None:
    """transformers >= 5 renames some checkpoint keys per class on load, and back on save (GPT-NeoX
    saves ``lm_head`` as ``embed_out``). It looks them up by class name and skips classes defined
    outside transformers, so the subclass is registered under its own name with the base's renaming."""
    try:
        from transformers import conversion_mapping as cm
        get, register = cm.get_checkpoint_conversion_mapping, cm.register_checkpoint_conversion_mapping
    except (ImportError, AttributeError):  # older transformers: no renaming on load or save
        return
    config_class = getattr(base, "config_class", None)
    mapping = get(base.__name__) or get(getattr(config_class, "model_type", None))
    if mapping:
        register(cls.__name__, mapping, overwrite=True)
