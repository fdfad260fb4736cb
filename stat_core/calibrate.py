"""Layer-by-layer calibration: run one transformer block at a time over cached hidden states.

The model's embeddings run once; after that every block runs on the stored outputs of the block
before it, so later blocks can be calibrated on the *pruned and corrected* outputs of earlier ones
(propagation) at the cost of one pass. Statistics stream into Gram matrices; memory is
``units²`` per block plus the hidden states of the calibration set (``n · T · d``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import ModelAdapter
from .linalg import GramAccumulator

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@dataclass
class BlockStats:
    """Calibration statistics of one transformer block.

    ``attn_gram: (heads·head_dim, heads·head_dim)`` of the per-head attention outputs (input of the
    output projection), ``mlp_gram: (d_ff, d_ff)`` of the MLP intermediate activations, both float64
    sums over ``n_tokens`` tokens; ``resid_energy`` = Σ‖x‖² of the block's input hidden states.
    """

    attn_gram: torch.Tensor
    mlp_gram: torch.Tensor
    n_tokens: int
    resid_energy: float

    def to(self, device) -> "BlockStats":
        return BlockStats(self.attn_gram.to(device), self.mlp_gram.to(device), self.n_tokens, self.resid_energy)


class LayerwiseRunner:
    """Holds the calibration hidden states and runs single blocks over them.

    ``windows: (n, T)`` token ids without padding (calibration windows are cut from running text).
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, batch_size: int = 8):
        self.model = model
        self.adapter = adapter
        self.device = next(model.parameters()).device
        self.batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
        self.layer_kwargs = self._capture_layer_kwargs(windows[:1])
        self.hidden = self._embed_all()

    @torch.no_grad()
    def _capture_layer_kwargs(self, one_window: torch.Tensor) -> list[dict]:
        """Keyword arguments (masks, rotary embeddings) each block receives, from one window.

        They depend on the sequence length, not on the content, and broadcast over the batch, so a
        one-window forward serves every batch. Gemma-3 gives sliding and global blocks different
        ones, hence one dict per block.
        """
        captured: list[dict | None] = [None] * self.adapter.num_layers

        def make_hook(idx):
            def hook(_module, args, kwargs):
                captured[idx] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            return hook

        handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
                   for i, layer in enumerate(self.adapter.layers)]
        try:
            self.model(input_ids=one_window.to(self.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for kw in captured:
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
        return captured

    @torch.no_grad()
    def _embed_all(self) -> list[torch.Tensor]:
        """Inputs of block 0 for every batch (runs the model only up to block 0)."""
        out: list[torch.Tensor] = []

        def hook(_module, args, kwargs):
            out.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

        handle = self.adapter.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in self.batches:
                try:
                    self.model(input_ids=batch.to(self.device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return out

    @torch.no_grad()
    def run_block(self, layer: int, hidden: list[torch.Tensor], adapter: ModelAdapter | None = None
                  ) -> list[torch.Tensor]:
        """Outputs of block ``layer`` (of ``adapter``'s model, default the runner's) on ``hidden``."""
        block = (adapter or self.adapter).layers[layer]
        outs = []
        for h in hidden:
            o = block(h, **self.layer_kwargs[layer])
            outs.append(o[0] if isinstance(o, tuple) else o)
        return outs

    @torch.no_grad()
    def collect_block(self, layer: int, hidden: list[torch.Tensor], adapter: ModelAdapter | None = None
                      ) -> tuple[BlockStats, list[torch.Tensor]]:
        """Run block ``layer`` over ``hidden`` with hooks; return its statistics and its outputs."""
        adapter = adapter or self.adapter
        attn_proj = adapter.attn_out_proj(layer)
        mlp_proj = adapter.mlp_out_proj(layer)
        stat_device = self.device
        attn_acc = GramAccumulator(attn_proj.in_features, stat_device)
        mlp_acc = GramAccumulator(mlp_proj.in_features, stat_device)
        handles = [attn_proj.register_forward_pre_hook(lambda _m, args: attn_acc.add(args[0])),
                   mlp_proj.register_forward_pre_hook(lambda _m, args: mlp_acc.add(args[0]))]
        try:
            outs = self.run_block(layer, hidden, adapter)
        finally:
            for h in handles:
                h.remove()
        energy = float(sum(float((h.float() ** 2).sum()) for h in hidden))
        return BlockStats(attn_acc.gram, mlp_acc.gram, attn_acc.n_rows, energy), outs


def output_sensitivity(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor,
                       batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Second moments of the loss gradient at each block's attention and MLP output.

    For every block, ``F = Σ_t g_t g_tᵀ / n_tokens`` (``(d, d)`` float64) with ``g_t`` the gradient of
    the summed next-token loss with respect to that block's output-projection output at token t.
    A perturbation ``δ_t`` there changes the loss by about ``½ Σ_t (g_tᵀ δ_t)²`` (empirical Fisher), so
    ``F`` turns each block's output residual into a loss estimate comparable across blocks: this
    is how the allocator accounts for error propagation through the later layers.
    """
    device = next(model.parameters()).device
    d = adapter.hidden_size
    fisher = [{"attn": torch.zeros(d, d, dtype=torch.float64, device=device),
               "mlp": torch.zeros(d, d, dtype=torch.float64, device=device)} for _ in range(adapter.num_layers)]
    n_tokens = 0
    handles = []

    def make_hook(idx, kind):
        def fwd_hook(_module, _args, output):
            def grad_hook(grad):
                g = grad.reshape(-1, grad.shape[-1]).to(torch.float32)
                fisher[idx][kind] += (g.T @ g).to(torch.float64)
            output.register_hook(grad_hook)
        return fwd_hook

    for i in range(adapter.num_layers):
        handles.append(adapter.attn_out_proj(i).register_forward_hook(make_hook(i, "attn")))
        handles.append(adapter.mlp_out_proj(i).register_forward_hook(make_hook(i, "mlp")))
    requires = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for start in range(0, len(windows), batch_size):
            ids = windows[start:start + batch_size].to(device)
            emb = model.get_input_embeddings()(ids)
            # Gradients flow from the loss to the hooked activations; weights stay frozen.
            emb = emb.detach().requires_grad_(True)
            # (Gemma's embedding module applies its scale itself, so this equals input_ids.)
            logits = model(inputs_embeds=emb, use_cache=False).logits
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               ids[:, 1:].reshape(-1), reduction="sum")
            loss.backward()
            n_tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    for f in fisher:
        f["attn"] /= n_tokens
        f["mlp"] /= n_tokens
    return fisher

