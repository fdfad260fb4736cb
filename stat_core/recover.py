"""Recovery after any pruning method: a short distillation of the pruned model towards the dense one.

``recover_(pruned, dense, data, steps)`` trains the *pruned* model's own parameters (shapes
unchanged: nothing is added or removed) for ``steps`` optimizer steps on the calibration windows
``data`` with one AdamW optimizer, minimising

    KL(dense ‖ pruned)  +  hidden_weight · mean over blocks of ‖h_pruned − h_dense‖² / ‖h_dense‖²

where the KL is over next-token distributions (decoders: every real position) or class
distributions (classifiers), and ``h`` are the block outputs (``output_hidden_states``; the
relative MSE is left out when the hidden sizes differ, e.g. after SliceGPT). The dense model is
only run under ``torch.no_grad`` in eval mode and never modified. Dropout is off (eval mode).

Progress: ``progress("recover", step, steps)``. Cancel: ``cancel_event`` (a ``threading.Event``)
is checked before every step; a cancelled (or failed) recovery puts every parameter and buffer of
the pruned model back exactly as it was before the first step and raises
:class:`RecoveryCancelled`.

Memory: one copy of the pruned model's state (the snapshot for cancel), AdamW's two moments, the
gradients and one batch's activations of both models; decoders take one window per step by default.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from stat_core.adapters import get_adapter
from stat_core.calibration.statistics import CalibrationSet

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


class RecoveryCancelled(Exception):
    """Recovery was cancelled; the pruned model is exactly as it was before recovery."""


@dataclass(frozen=True)
class RecoveryConfig:
    """``steps`` optimizer steps of AdamW(``lr``) on batches of ``batch_size`` windows (``None``:
    1 for decoders, 16 for classifiers), drawn without replacement, epoch after epoch (seeded)."""

    steps: int
    lr: float = 1e-5
    batch_size: int | None = None
    warmup: float = 0.1      # fraction of the steps over which the lr rises linearly from 0 (Adam's first
                             # steps move every weight by about ±lr, gradient or not)
    hidden_weight: float = 1.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"recovery steps must be a whole number ≥ 0, got {self.steps!r}")
        if not self.lr > 0 or self.hidden_weight < 0 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError("recovery needs lr > 0, hidden_weight ≥ 0 and batch_size ≥ 1")


def _is_decoder(dense) -> bool:
    return get_adapter(dense).is_decoder


def distillation_loss(student_out, teacher_out, attention_mask: torch.Tensor | None, hidden_weight: float,
                      decoder: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, kl, hidden_mse)`` of one batch. ``kl``: mean KL(teacher ‖ student) per prediction
    (decoders: per real position of ``logits: (B, T, V)``; classifiers: per example of ``(B, C)``);
    ``hidden_mse``: mean over blocks of the relative squared error of the block outputs on real
    tokens (``None`` when off or the hidden sizes differ)."""
    s_logp = student_out.logits.float().log_softmax(-1)
    t_logp = teacher_out.logits.float().log_softmax(-1)
    kl_each = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (B, T) or (B,)
    mask = None
    if decoder and attention_mask is not None:
        mask = attention_mask.to(kl_each.device, kl_each.dtype)
        kl = (kl_each * mask).sum() / mask.sum().clamp_min(1)
    else:
        kl = kl_each.mean()
    mse = None
    hs, ht = getattr(student_out, "hidden_states", None), getattr(teacher_out, "hidden_states", None)
    if hidden_weight > 0 and hs is not None and ht is not None and len(hs) == len(ht) \
            and all(a.shape == b.shape for a, b in zip(hs[1:], ht[1:])):
        terms = []
        tok = None if attention_mask is None else attention_mask.to(hs[1].device).bool()
        for a, b in zip(hs[1:], ht[1:]):
            a, b = a.float(), b.float()
            if tok is not None:
                a, b = a[tok], b[tok]
            terms.append(((a - b) ** 2).mean() / (b ** 2).mean().clamp_min(1e-12))
        mse = torch.stack(terms).mean()
    loss = kl if mse is None else kl + hidden_weight * mse
    return loss, kl, mse


def _forward(model, batch: CalibrationSet, device, decoder: bool, hidden: bool):
    kwargs = batch.model_inputs(device)
    if decoder:
        kwargs["use_cache"] = False
    return model(**kwargs, output_hidden_states=hidden)


def recover_(model, dense, data, config: RecoveryConfig | int, progress: ProgressFn | None = None,
             cancel_event: threading.Event | None = None) -> dict:
    """Distil the pruned ``model`` towards ``dense`` in place for ``config.steps`` steps (see the
    module docstring). ``data``: the calibration windows (``(n, T)`` ids or a :class:`CalibrationSet`).

    Returns ``{"steps", "seconds", "lr", "batch_size", "hidden_weight", "loss_first", "loss_last",
    "kl_first", "kl_last", "hidden_mse": bool}`` (first/last: means over the first and last tenth
    of the steps). Raises :class:`RecoveryCancelled` after restoring the model when cancelled.
    """
    if isinstance(config, int):
        config = RecoveryConfig(steps=config)
    data = CalibrationSet.wrap(data)
    if len(data) == 0:
        raise ValueError("recovery needs calibration windows; got none")
    decoder = _is_decoder(dense)
    batch_size = config.batch_size or (1 if decoder else 16)
    device = next(model.parameters()).device
    dense_device = next(dense.parameters()).device
    t0 = time.perf_counter()
    info = {**asdict(config), "batch_size": batch_size, "steps": 0, "seconds": 0.0, "hidden_mse": False}
    if config.steps == 0:
        return info

    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    was_training, dense_training = model.training, dense.training
    snapshot = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses, kls = [], []
    finished = False
    try:
        model.eval()   # no dropout: the target is the dense model's deterministic output
        dense.eval()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        warm = max(1, int(config.warmup * config.steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        for step in range(config.steps):
            if cancel_event is not None and cancel_event.is_set():
                raise RecoveryCancelled("recovery cancelled; the pruned model is as it was before recovery")
            if len(order) < batch_size:
                order += torch.randperm(len(data), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            batch = data.take(torch.tensor(idx))
            with torch.no_grad():
                t_out = _forward(dense, batch, dense_device, decoder, config.hidden_weight > 0)
            if dense_device != device:
                t_out.logits = t_out.logits.to(device)
                if getattr(t_out, "hidden_states", None) is not None:
                    t_out.hidden_states = tuple(h.to(device) for h in t_out.hidden_states)
            s_out = _forward(model, batch, device, decoder, config.hidden_weight > 0)
            loss, kl, mse = distillation_loss(s_out, t_out, batch.attention_mask, config.hidden_weight, decoder)
            del t_out
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            kls.append(float(kl.detach()))
            info["hidden_mse"] = mse is not None
            del s_out, loss, kl, mse
            if progress is not None:
                progress("recover", step + 1, config.steps)
        finished = True
    finally:
        opt = sched = None
        for p, r in zip(params, requires):
            p.grad = None
            p.requires_grad_(r)
        if not finished:  # cancelled or failed: every weight and buffer back as before
            with torch.no_grad():
                for k, v in model.state_dict(keep_vars=True).items():
                    v.copy_(snapshot[k])
        del snapshot
        model.train(was_training)
        dense.train(dense_training)
    tenth = max(1, len(losses) // 10)
    info.update(steps=len(losses), seconds=time.perf_counter() - t0,
                loss_first=sum(losses[:tenth]) / tenth, loss_last=sum(losses[-tenth:]) / tenth,
                kl_first=sum(kls[:tenth]) / tenth, kl_last=sum(kls[-tenth:]) / tenth)
    log.info("recovery: %d steps in %.1f s, distillation loss %.4g -> %.4g", info["steps"], info["seconds"],
             info["loss_first"], info["loss_last"])
    return info


__all__ = ["RecoveryCancelled", "RecoveryConfig", "distillation_loss", "recover_"]
