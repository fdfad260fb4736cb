"""SliceGPT — delete rows and columns of a rotated model (Ashkboos et al., ICLR 2024).

Paper: "SliceGPT: Compress Large Language Models by Deleting Rows and Columns", arXiv 2401.15024.
Read from the authors' code (microsoft/TransformerCompression, ``src/slicegpt``: ``layernorm_fusion.py``
``fuse_modules``, ``rotate.py`` ``rotate_and_slice_sequential`` and ``pca_calc``, ``modules.py``
``RMSN``, ``adapters/llama_adapter.py`` ``CompressedLlamaDecoderLayer``, ``experiments/run_slicegpt.py``
for the defaults); this is our own implementation on this project's layer-by-layer runner.

What it does. A pre-norm transformer is invariant under an orthogonal change of basis ``Q`` of its
residual stream once every RMSNorm is a plain RMS normalisation (rotation commutes with
``x / ‖x‖``): fold each norm's scale into the linears that read its output (q/k/v after
``input_layernorm``, gate/up after ``post_attention_layernorm``, the LM head after the final norm),
then rotate the embeddings' and every writing linear's outputs (``o_proj``, ``down_proj``) by ``Qᵀ`` and
every reading linear's inputs (q/k/v, gate/up, LM head) by ``Q``. With a different ``Q`` at each
point of the stream the residual connections carry the change of basis: ``x_out = x_in·Q_aᵀQ_b +
f(x_in)`` ("shortcut" matrices, one per residual connection).

What it scores: the eigenvalues of the residual stream's second moment ``Σ xxᵀ`` (PCA without
centring, float64), at every block input and between attention and MLP; ``Q`` = eigenvectors,
descending. What it removes: the ``d − d'`` least-energy directions, i.e. rows of the writing
linears (and of the embeddings), columns of the reading linears, rows and columns of the shortcuts.
The hidden size becomes ``d'``. What replaces a correction: the rotation itself plus the shortcut
matrices ``Q_aᵀQ_b`` (``d' × d'``); nothing is re-fitted.

How it allocates: one slicing fraction for every layer (the authors' default constant scheduler).
Each PCA is computed on the already rotated-and-sliced model's path, layer by layer, exactly as
``rotate_and_slice_sequential`` does: the input of layer ``i`` carries the slicing error of layers
``< i``.

Details kept from the authors' code: the RMS normalisation after slicing divides ``Σx²`` by the
*original* width ``d`` (their ``RMSN(mean_dim=hidden_size)``): the sliced directions are the
low-energy ones, so ``Σ_{kept} x² / d`` approximates the dense ``‖x‖²/d``; the embedding matrix is
sliced to ``d'``; by default the LM head is rotated but not sliced (their ``do_slice_head=False``):
the last layer's MLP then writes the full width ``d`` and its shortcut is ``d' × d``.

Our adaptations: (1) the budget is this project's: ``d'`` is solved so that the sliced blocks'
attention + MLP weights *plus the added shortcut matrices* equal ``(1 − sparsity)`` of the dense
blocks' parameters (nearest integer ``d'``; the authors instead set ``d' = (1 − s)·d`` rounded down
to a multiple of 8 and count all parameters); embedding and LM-head savings are reported, not
counted. (2) Their ``fuse_modules`` also subtracts each embedding row's mean, which is
function-preserving only for LayerNorm models (OPT); for RMSNorm models it changes the logits, so we
skip it. (3) Their PCA adds ``0.01·mean(diag)`` to the diagonal before ``eigh``: that shifts every
eigenvalue equally and leaves the eigenvectors unchanged, so we omit it. (4) A tied LM head is
untied first (the head and the embeddings receive different rotations); this adds the head's
``vocab × d`` parameters to the model. (5) Llama, Mistral, Qwen2 and Qwen3 only: Gemma-3's norms
after each sub-block scale the sub-block's output by a learned vector that cannot be folded through
a rotation.

The sliced model still runs under the stock ``*Model.forward`` and ``generate``: each decoder layer
becomes an instance of a subclass of its own class (``SliceGPT<Layer>``) with the two shortcut
matrices as parameters, and the norms become :class:`FixedWidthRMSNorm`. It does not load back with
stock ``from_pretrained``; ``config.slicegpt`` records the new widths.

Measured once (SmolLM2-135M, 16 × 512 Wikipedia calibration tokens, 20% of block parameters
removed = hidden size 576 → 405, 29.7% slicing, shortcuts 9.9M of the 84.8M block parameters left):
perplexity 17.0 → 91.4 on the first 4,096 evaluation tokens, 162 s on 2 shared CPU cores. Because
the tied head is untied, the whole model shrinks only from 134.5M to 133.0M parameters.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from stat_core.adapters import get_adapter
from stat_core.adapters.base import slice_linear_
from stat_core.adapters.registry import families_where, family_of
from stat_core.calibration.statistics import CalibrationSet, LayerwiseRunner
from stat_core.linalg import GramAccumulator
from stat_core.methods.base import MethodNotApplicable, PruningMethod
from stat_core.surgery.budget import block_parameter_count

if TYPE_CHECKING:  # pragma: no cover
    from stat_core.calibration.statistics import CalibrationSet, LayerwiseRunner
    from stat_core.config import PruneConfig

log = logging.getLogger(__name__)

#: Families whose blocks are ``x + attn(norm(x))``, ``x + mlp(norm(x))`` with plain scaled RMSNorms.
SUPPORTED_MODEL_TYPES = families_where(rotatable=True)  # from the family descriptions

ProgressFn = Callable[[str, int, int], None]


# --- modules of the sliced model -------------------------------------------------------------------

class FixedWidthRMSNorm(nn.Module):
    """RMS normalisation without a scale, dividing ``Σx²`` by a fixed ``mean_dim`` (the dense width)
    whatever the input's width: ``x: (..., d') -> (..., d')``, computed in float32, returned in
    ``x.dtype`` (as the stock Llama norm, whose scale now lives in the next linear)."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim = int(mean_dim)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x32 * torch.rsqrt(variance + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


def _shortcut(residual: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """``residual: (..., d_a) @ q: (d_a, d_b)``; the identity when ``q`` is None."""
    return residual if q is None else residual @ q


class SliceGPTLayerMixin:
    """Forward of a pre-norm decoder layer whose residual connections carry shortcut matrices.

    ``attn_shortcut_Q: (d_in, d_mid)`` and ``mlp_shortcut_Q: (d_mid, d_out)`` (None: identity).
    ``hidden_states: (batch, T, d_in) -> (batch, T, d_out)``. Mixed in before the family's own
    layer class so ``isinstance`` checks (output capturing, layer types) still hold.
    """

    def slicegpt_attention(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                           past_key_values=None, use_cache: bool | None = False, position_embeddings=None,
                           **kwargs) -> torch.Tensor:
        """``(batch, T, d_in) -> (batch, T, d_mid)``: shortcut(x) + attention(norm(x))."""
        attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                     position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                     position_embeddings=position_embeddings, **kwargs)
        return _shortcut(hidden_states, self.attn_shortcut_Q) + attn_out

    def slicegpt_mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(batch, T, d_mid) -> (batch, T, d_out)``: shortcut(x) + mlp(norm(x))."""
        return _shortcut(hidden_states, self.mlp_shortcut_Q) + self.mlp(self.post_attention_layernorm(hidden_states))

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = False, position_embeddings=None, **kwargs) -> torch.Tensor:
        hidden_states = self.slicegpt_attention(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                                past_key_values=past_key_values, use_cache=use_cache,
                                                position_embeddings=position_embeddings, **kwargs)
        return self.slicegpt_mlp(hidden_states)


def _sliced_layer_class(cls: type) -> type:
    """``SliceGPT<cls>``: the mixin over the family's layer class (one per class, module-level so
    pickling finds it)."""
    if issubclass(cls, SliceGPTLayerMixin):
        return cls
    name = f"SliceGPT{cls.__name__}"
    existing = globals().get(name)
    if existing is not None and existing.__mro__[2] is cls:
        return existing
    new = type(name, (SliceGPTLayerMixin, cls), {"__module__": __name__, "__doc__": SliceGPTLayerMixin.__doc__})
    globals()[name] = new
    return new


# --- norm folding ----------------------------------------------------------------------------------

def _final_norm_owner(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not hasattr(decoder, "norm"):
        raise MethodNotApplicable("SliceGPT needs the decoder's final norm at `model.norm`")
    return decoder


def _rms_norm_eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise MethodNotApplicable(f"cannot read the epsilon of {type(norm).__name__}")


def _shares_weight(a: nn.Module, b: nn.Module) -> bool:
    return a.weight is b.weight or a.weight.data_ptr() == b.weight.data_ptr()


@torch.no_grad()
def _scale_columns_(linear: nn.Linear, scale: torch.Tensor) -> None:
    """``W ← W · diag(scale)`` (``W: (out, in)``, ``scale: (in,)``), in float64, dtype kept."""
    w = linear.weight
    linear.weight.data = (w.detach().to(torch.float64) * scale.to(w.device, torch.float64)).to(w.dtype)


@torch.no_grad()
def fold_norms_(model: nn.Module) -> dict:
    """Make ``model`` (a supported causal decoder, see :data:`SUPPORTED_MODEL_TYPES`) rotation-ready
    in place without changing its function.

    Unties a tied LM head; folds every RMSNorm scale ``g`` into the linears reading its output
    (``W ← W diag(g)``) and replaces the norm by :class:`FixedWidthRMSNorm` (same width and epsilon);
    turns each decoder layer into ``SliceGPT<Layer>`` with identity shortcuts. Returns
    ``{"untied_lm_head": bool}``.
    """
    adapter = get_adapter(model)
    d = adapter.hidden_size
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    untied = _shares_weight(emb, head)
    if untied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    configs = [model.config]
    if hasattr(model.config, "get_text_config") and model.config.get_text_config() is not model.config:
        configs.append(model.config.get_text_config())
    for cfg in configs:
        cfg.tie_word_embeddings = False  # keep `tie_weights()` (save/load, resize) from re-tying them
    for i, layer in enumerate(adapter.layers):
        norm_in, norm_post = layer.input_layernorm, layer.post_attention_layernorm
        for linear in [adapter.query_proj(i), *adapter.key_value_projs(i)]:
            _scale_columns_(linear, norm_in.weight.detach())
        for linear in adapter.mlp_in_projs(i):
            _scale_columns_(linear, norm_post.weight.detach())
        layer.input_layernorm = FixedWidthRMSNorm(d, _rms_norm_eps(norm_in))
        layer.post_attention_layernorm = FixedWidthRMSNorm(d, _rms_norm_eps(norm_post))
        layer.__class__ = _sliced_layer_class(type(layer))
        layer.register_parameter("attn_shortcut_Q", None)
        layer.register_parameter("mlp_shortcut_Q", None)
    owner = _final_norm_owner(model)
    _scale_columns_(head, owner.norm.weight.detach())
    owner.norm = FixedWidthRMSNorm(d, _rms_norm_eps(owner.norm))
    return {"untied_lm_head": bool(untied)}


# --- PCA and the rotation ---------------------------------------------------------------------------

def pca_basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the uncentred second moment ``gram = Σ xxᵀ: (d, d)`` in float64.

    Returns ``(eigenvalues: (d,), Q: (d, d))`` sorted by descending eigenvalue; column ``j`` of ``Q``
    is the ``j``-th principal direction.
    """
    g = gram.to(torch.float64)
    if g.device.type == "cpu":  # LAPACK through numpy: several times faster than torch's eigh on few CPU threads
        vals_np, vecs_np = np.linalg.eigh(g.numpy())
        vals, vecs = torch.from_numpy(vals_np), torch.from_numpy(vecs_np)
    else:
        vals, vecs = torch.linalg.eigh(g)
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def random_orthogonal(d: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """A Haar-random orthogonal ``(d, d)`` float64 matrix (QR of a Gaussian, signs fixed)."""
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))).to(device)


def _kept_energy(vals: torch.Tensor, width: int) -> float:
    total = float(vals.clamp_min(0).sum())
    return float(vals[:width].clamp_min(0).sum()) / total if total > 0 else 1.0


@torch.no_grad()
def _set_weight_(linear: nn.Linear, weight64: torch.Tensor, bias64: torch.Tensor | None = None) -> None:
    """Replace ``linear``'s weight (and bias, when given) by float64 values, dtype/device kept."""
    slice_linear_(linear, new_weight=weight64)
    if bias64 is not None and linear.bias is not None:
        b = linear.bias
        linear.bias = nn.Parameter(bias64.to(b.device, b.dtype).contiguous(), requires_grad=b.requires_grad)


def _rotate_inputs_(linear: nn.Linear, q: torch.Tensor, width: int) -> None:
    """Reading linear ``W: (out, d) -> W Q[:, :width]: (out, width)`` (``q: (d, d)``)."""
    _set_weight_(linear, linear.weight.detach().to(q.device, torch.float64) @ q[:, :width])


def _rotate_outputs_(linear: nn.Linear, q: torch.Tensor, width: int) -> None:
    """Writing linear ``W: (d, in) -> Q[:, :width]ᵀ W: (width, in)``; its bias ``b -> Q[:, :width]ᵀ b``."""
    qs = q[:, :width].T
    bias = None if linear.bias is None else qs @ linear.bias.detach().to(q.device, torch.float64)
    _set_weight_(linear, qs @ linear.weight.detach().to(q.device, torch.float64), bias)


def _shortcut_parameter(q64: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(q64.to(like.device, like.dtype).contiguous(), requires_grad=like.requires_grad)


def _project(hidden: list[torch.Tensor], q: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Every ``(b, T, d)`` batch in the basis ``Q[:, :width]``: ``(b, T, width)``, dtype kept."""
    out = []
    for h in hidden:
        qs = q[:, :width].to(h.device, torch.float32)
        out.append((h.to(torch.float32) @ qs).to(h.dtype))
    return out


def _block_args(runner: "LayerwiseRunner", layer: int, index: int) -> tuple[tuple, dict]:
    if runner.per_batch_args:
        return runner.batch_args[index]
    return (), runner.layer_kwargs[layer]


def _pca(batches: list[torch.Tensor], masks: list[torch.Tensor | None], basis: str,
         generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues, Q)`` of the stacked rows of ``batches: [(b, T, d)]`` (padding rows left out);
    ``basis="random"``: a Haar-random orthogonal ``Q`` instead, returned with the energy each of its
    directions carries, ``diag(Qᵀ G Q)`` (unsorted)."""
    d = batches[0].shape[-1]
    acc = GramAccumulator(d, batches[0].device)
    for h, m in zip(batches, masks):
        acc.add(h, m)
    gram = acc.gram
    if basis == "pca":
        return pca_basis(gram)
    q = random_orthogonal(d, generator, gram.device)
    return torch.diagonal(q.T @ gram @ q), q


@torch.no_grad()
def rotate_and_slice_(model: nn.Module, data, width: int, *, batch_size: int = 8, slice_head: bool = False,
                      basis: str = "pca", seed: int = 0, progress: ProgressFn | None = None) -> dict:
    """SliceGPT on a causal decoder in place: fold the norms, then rotate and slice layer by layer.

    ``data``: calibration token ids ``(n, T)`` or a :class:`~stat_core.calibration.statistics.CalibrationSet`;
    ``width``: the new hidden size ``d'`` (``width = d`` rotates without slicing: the function is
    unchanged up to rounding). ``slice_head``: also slice the LM head's input (the last layer then
    writes ``d'``, not ``d``). ``basis="random"``: Haar-random rotations instead of PCA (a control).

    Returns the per-PCA kept energy fractions and the untying flag.
    """

    if basis not in ("pca", "random"):
        raise ValueError(f"basis must be 'pca' or 'random', got {basis!r}")
    adapter = get_adapter(model)
    d = adapter.hidden_size
    if not 1 <= width <= d:
        raise ValueError(f"width must be in [1, {d}], got {width}")
    generator = torch.Generator().manual_seed(seed) if basis == "random" else None
    folded = fold_norms_(model)
    runner = LayerwiseRunner(model, adapter, CalibrationSet.wrap(data), batch_size)
    masks = [runner.token_mask(i) for i in range(len(runner.batches))]
    n_layers = adapter.num_layers

    vals, q_in = _pca(runner.hidden, masks, basis, generator)
    energy = {"embeddings": _kept_energy(vals, width), "attention": [], "mlp": []}
    emb = model.get_input_embeddings()
    w = emb.weight
    emb.weight = nn.Parameter((w.detach().to(q_in.device, torch.float64) @ q_in[:, :width]).to(w.device, w.dtype),
                              requires_grad=w.requires_grad)
    emb.embedding_dim = width
    hidden = _project(runner.hidden, q_in, width)
    runner.hidden = []  # the dense inputs are no longer needed

    for i, layer in enumerate(adapter.layers):
        d_out = d if (i == n_layers - 1 and not slice_head) else width
        like = adapter.query_proj(i).weight
        # Attention: inputs in the previous basis; output left in the original basis to measure it.
        for linear in [adapter.query_proj(i), *adapter.key_value_projs(i)]:
            _rotate_inputs_(linear, q_in, width)
        layer.attn_shortcut_Q = _shortcut_parameter(q_in[:, :width].T, like)
        mids = []
        for j, h in enumerate(hidden):
            args, kwargs = _block_args(runner, i, j)
            mids.append(layer.slicegpt_attention(h, *args, **kwargs))
        vals, q_mid = _pca(mids, masks, basis, generator)
        energy["attention"].append(_kept_energy(vals, width))
        _rotate_outputs_(adapter.attn_out_proj(i), q_mid, width)
        layer.attn_shortcut_Q = _shortcut_parameter(q_in[:, :width].T @ q_mid[:, :width], like)
        mids = _project(mids, q_mid, width)
        # MLP: the same with the mid-block basis.
        for linear in adapter.mlp_in_projs(i):
            _rotate_inputs_(linear, q_mid, width)
        layer.mlp_shortcut_Q = _shortcut_parameter(q_mid[:, :width].T, like)
        outs = [layer.slicegpt_mlp(h) for h in mids]
        del mids
        vals, q_out = _pca(outs, masks, basis, generator)
        energy["mlp"].append(_kept_energy(vals, d_out))
        _rotate_outputs_(adapter.mlp_out_proj(i), q_out, d_out)
        layer.mlp_shortcut_Q = _shortcut_parameter(q_mid[:, :width].T @ q_out[:, :d_out], like)
        hidden = _project(outs, q_out, d_out)
        del outs
        q_in = q_out
        if progress is not None:
            progress("slicegpt", i + 1, n_layers)
        log.debug("SliceGPT layer %d: kept energy attention %.4f, mlp %.4f", i, energy["attention"][-1],
                  energy["mlp"][-1])
    head_width = width if slice_head else d
    _rotate_inputs_(model.get_output_embeddings(), q_in, head_width)
    model.config.slicegpt = {"hidden_size": width, "original_hidden_size": d, "lm_head_sliced": bool(slice_head)}
    return {"kept_energy": energy, **folded}


# --- the budget ------------------------------------------------------------------------------------

def _bias_numel(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else linear.bias.numel()


def sliced_block_params(adapter, width: int, slice_head: bool = False) -> int:
    """Block parameters (attention + MLP linears, biases included, as
    :func:`~stat_core.surgery.budget.block_parameter_count` counts them) of the *dense* ``adapter``'s model
    after slicing to hidden size ``width``, plus the shortcut matrices SliceGPT adds."""
    d = adapter.hidden_size
    total = 0
    for i in range(adapter.num_layers):
        d_out = d if (i == adapter.num_layers - 1 and not slice_head) else width
        readers_attn = [adapter.query_proj(i), *adapter.key_value_projs(i)]
        readers_mlp = adapter.mlp_in_projs(i)
        o, down = adapter.attn_out_proj(i), adapter.mlp_out_proj(i)
        total += sum(m.out_features * width + _bias_numel(m) for m in readers_attn + readers_mlp)
        total += o.in_features * width + (width if o.bias is not None else 0)
        total += down.in_features * d_out + (d_out if down.bias is not None else 0)
        total += width * width + width * d_out  # attn_shortcut_Q, mlp_shortcut_Q
    return total


def width_for_budget(adapter, sparsity: float, slice_head: bool = False, multiple_of: int = 1) -> int:
    """The hidden size ``d'`` (a multiple of ``multiple_of``) whose sliced blocks, shortcuts included,
    come nearest to ``(1 − sparsity)`` of the dense blocks' parameters."""
    target = (1.0 - sparsity) * block_parameter_count(adapter)
    candidates = list(range(multiple_of, adapter.hidden_size + 1, multiple_of))
    return min(candidates, key=lambda w: (abs(sliced_block_params(adapter, w, slice_head) - target), -w))


# --- the method ------------------------------------------------------------------------------------

class SliceGPT(PruningMethod):
    """SliceGPT (see the module docstring). ``slice_head``: also slice the LM head's input (the
    authors' default is not to); ``multiple_of``: round the new hidden size to a multiple of this
    (the authors' CLI uses 8; 1 meets this project's budget most closely)."""

    name = "slicegpt"
    label = "SliceGPT"
    summary = ("PCA of the residual stream per layer, rotate and delete the weakest hidden directions "
               "(one slicing fraction for all layers); rotation + shortcut matrices, no refit")
    whole_model = True
    decoder_only = True

    def __init__(self, slice_head: bool = False, multiple_of: int = 1):
        self.slice_head = slice_head
        self.multiple_of = multiple_of

    def check_applicable(self, model) -> None:
        super().check_applicable(model)
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if getattr(config, "slicegpt", None):
            raise MethodNotApplicable("this model has already been sliced by SliceGPT; start from the dense model")
        if model_type not in SUPPORTED_MODEL_TYPES:
            family = family_of(str(model_type))
            why = f" ({family.rotation_note})" if family is not None and family.rotation_note else ""
            raise MethodNotApplicable(f"SliceGPT here supports {', '.join(SUPPORTED_MODEL_TYPES)} decoders, "
                                      f"not {model_type}{why}")
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise MethodNotApplicable("SliceGPT needs a causal language model with an LM head to rotate")

    def prune_(self, model, data: "CalibrationSet", config: "PruneConfig", progress=None) -> dict:
        """Slice ``model`` in place to meet ``config.sparsity`` of the block parameters, shortcuts
        included; returns the summary (widths, parameter counts, kept PCA energy, time)."""
        if config.budget_kind != "params":
            raise ValueError("SliceGPT's budget is counted in parameters; use budget_kind='params'")
        t0 = time.perf_counter()
        adapter = get_adapter(model)
        d = adapter.hidden_size
        before = block_parameter_count(adapter)
        width = width_for_budget(adapter, config.sparsity, self.slice_head, self.multiple_of)
        predicted = sliced_block_params(adapter, width, self.slice_head)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = _shares_weight(emb, head)
        emb_before, head_before = emb.weight.numel(), head.weight.numel()
        total_before = sum(p.numel() for p in model.parameters())
        log.info("SliceGPT: hidden size %d -> %d (slicing %.1f%%) for %.1f%% of block parameters",
                 d, width, 100 * (1 - width / d), 100 * config.sparsity)
        detail = rotate_and_slice_(model, data, width, batch_size=config.batch_size, slice_head=self.slice_head,
                                   progress=progress)
        shortcuts = sum(p.numel() for layer in adapter.layers for p in (layer.attn_shortcut_Q, layer.mlp_shortcut_Q))
        after = block_parameter_count(get_adapter(model)) + shortcuts
        if after != predicted:  # internal bug: the solver's count and the model disagree
            raise AssertionError(f"SliceGPT budget count {predicted} != sliced model's {after}")
        total_after = sum(p.numel() for p in model.parameters())
        return {
            "method": self.name,
            "target": config.sparsity,
            "slicing_fraction": 1 - width / d,
            "hidden_size_before": d,
            "hidden_size_after": width,
            "block_params_before": before,
            "block_params_after": after,
            "shortcut_params": shortcuts,
            "removed_fraction": 1 - after / before,
            "embeddings_sliced": True,
            "lm_head_sliced": self.slice_head,
            "lm_head_untied": detail["untied_lm_head"],
            "embedding_params_before": emb_before,
            "embedding_params_after": emb.weight.numel(),
            "lm_head_params_before": 0 if tied else head_before,
            "lm_head_params_after": model.get_output_embeddings().weight.numel(),
            "total_params_before": total_before,
            "total_params_after": total_after,
            "budget_note": ("block parameters include the added shortcut matrices; the embedding and LM-head "
                            "changes are not counted in the budget" + ("; the tied LM head was untied, adding "
                                                                       "its parameters" if tied else "")),
            "kept_energy": detail["kept_energy"],
            "seconds": time.perf_counter() - t0,
        }
