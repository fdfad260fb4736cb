"""Layer-by-layer calibration: run one transformer block at a time over cached hidden states.

The model's embeddings run once; after that every block runs on the stored outputs of the block
before it, so later blocks can be calibrated on the *pruned and corrected* outputs of earlier ones
(propagation) at the cost of one pass. Statistics stream into Gram matrices; memory is
``units²`` per block plus the hidden states of the calibration set (``n · T · d``).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stat_core.adapters import ModelAdapter
from stat_core.linalg import GramAccumulator

log = logging.getLogger(__name__)


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``: a forward or
    backward pass leaves many mid-sized blocks in malloc's arenas, which a later stage would otherwise
    stack its own peak on); a no-op elsewhere."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _StopForward(Exception):
    pass


@dataclass
class CalibrationSet:
    """Calibration inputs. ``input_ids: (n, T)``; ``attention_mask: (n, T)`` (1 = real token, 0 =
    padding; padding never enters a statistic); ``labels: (n,)`` class labels for classifiers
    (used by the sensitivity pass; decoders use next-token targets instead)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @classmethod
    def wrap(cls, data) -> "CalibrationSet":
        return data if isinstance(data, cls) else cls(input_ids=data)

    def __len__(self) -> int:
        return len(self.input_ids)

    def take(self, index) -> "CalibrationSet":
        """Rows ``index`` (a slice or an index tensor) of every field."""
        return CalibrationSet(self.input_ids[index], None if self.attention_mask is None else self.attention_mask[index],
                              None if self.labels is None else self.labels[index])

    def subset(self, n: int) -> "CalibrationSet":
        return self.take(slice(0, n))

    def spread(self, n: int) -> "CalibrationSet":
        """``n`` rows evenly spaced over the set (chunks of one long text sit next to each other)."""
        return self.take(torch.linspace(0, len(self) - 1, steps=min(n, len(self))).round().long().unique())

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.take(slice(i, i + batch_size))

    def model_inputs(self, device) -> dict:
        """``input_ids`` (and ``attention_mask`` when padded) on ``device``, ready for ``model(**...)``."""
        inputs = {"input_ids": self.input_ids.to(device)}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask.to(device)
        return inputs


@dataclass
class BlockStats:
    """Calibration statistics of one transformer block.

    ``attn_gram: (heads·head_dim, heads·head_dim)`` of the per-head attention outputs (input of the
    output projection), ``mlp_gram: (d_ff, d_ff)`` of the MLP intermediate activations, both float64
    sums over ``n_tokens`` tokens; ``resid_energy`` = Σ‖x‖² of the block's input hidden states;
    ``attn_sum: (heads·head_dim,)`` and ``mlp_sum: (d_ff,)`` the float64 column sums beside the Grams
    (means and variances for methods that need them; like the Grams, plain sums that merge exactly).
    """

    attn_gram: torch.Tensor
    mlp_gram: torch.Tensor
    n_tokens: int
    resid_energy: float
    attn_sum: torch.Tensor | None = None
    mlp_sum: torch.Tensor | None = None

    def mean(self, kind: str) -> torch.Tensor:
        """Column means of the ``"attn"`` or ``"mlp"`` activations: ``(n_units,)`` float64."""
        total = self.attn_sum if kind == "attn" else self.mlp_sum
        if total is None:
            raise ValueError("these statistics were collected without column sums; re-run the calibration")
        return total / max(self.n_tokens, 1)

    def second_moment(self, kind: str, centered: bool = False) -> torch.Tensor:
        """The Gram ``ZᵀZ`` of the ``"attn"`` or ``"mlp"`` activations, or with ``centered`` the
        scatter ``(Z − 1μᵀ)ᵀ(Z − 1μᵀ) = ZᵀZ − n μμᵀ`` (what a least-squares fit *with an intercept*
        sees: the mean is carried by a bias instead)."""
        gram = self.attn_gram if kind == "attn" else self.mlp_gram
        if not centered:
            return gram
        total = (self.attn_sum if kind == "attn" else self.mlp_sum)
        if total is None:
            raise ValueError("these statistics were collected without column sums; re-run the calibration")
        total = total.to(gram.device, torch.float64)
        # gram − outer(total, total) / n with one n×n temporary (the result), the same numbers.
        centered = torch.outer(total, total).div_(max(self.n_tokens, 1))
        return torch.sub(gram, centered, out=centered)

    def variance(self, kind: str) -> torch.Tensor:
        """Per-column variance ``E[z²] − E[z]²`` over the calibration tokens: ``(n_units,)``."""
        gram = self.attn_gram if kind == "attn" else self.mlp_gram
        mu = self.mean(kind)
        return (torch.diagonal(gram) / max(self.n_tokens, 1) - mu ** 2).clamp_min(0.0)

    # --- merging and storage: every field is a plain sum, so statistics of disjoint sets of
    # calibration tokens add up exactly to the statistics of their union ---

    def merge(self, other: "BlockStats") -> "BlockStats":
        """Statistics of the union of the two token sets (each field summed; on ``self``'s device).
        Column sums survive only when both sides have them."""
        if self.attn_gram.shape != other.attn_gram.shape or self.mlp_gram.shape != other.mlp_gram.shape:
            raise ValueError(f"cannot merge statistics of differently shaped blocks "
                             f"({tuple(self.attn_gram.shape)}/{tuple(self.mlp_gram.shape)} vs "
                             f"{tuple(other.attn_gram.shape)}/{tuple(other.mlp_gram.shape)})")
        dev = self.attn_gram.device

        def add(a, b):
            return None if a is None or b is None else a + b.to(dev)

        return BlockStats(self.attn_gram + other.attn_gram.to(dev), self.mlp_gram + other.mlp_gram.to(dev),
                          self.n_tokens + other.n_tokens, self.resid_energy + other.resid_energy,
                          add(self.attn_sum, other.attn_sum), add(self.mlp_sum, other.mlp_sum))

    __add__ = merge

    def to(self, device) -> "BlockStats":
        """The same statistics with every tensor on ``device``."""
        def move(t):
            return None if t is None else t.to(device)

        return BlockStats(move(self.attn_gram), move(self.mlp_gram), self.n_tokens, self.resid_energy,
                          move(self.attn_sum), move(self.mlp_sum))


@dataclass
class PairedStats:
    """Cross products of one block's activations on the pruned path (``Z``) with the same block's
    on the dense path (``Z_d``), token for token: ``cross[kind] = Zᵀ Z_d`` ``(n_units, n_units)`` and
    ``dense_sum[kind] = Σ_t z_d`` (float64 sums over ``n_tokens``). With the pruned path's Gram they
    give the least-squares map from the kept units of the pruned model to the dense model's
    activations (:func:`stat_core.surgery.apply.dense_target_correction`)."""

    cross: dict[str, torch.Tensor]
    dense_sum: dict[str, torch.Tensor]
    n_tokens: int

    def to(self, device) -> "PairedStats":
        return PairedStats({k: v.to(device) for k, v in self.cross.items()},
                           {k: v.to(device) for k, v in self.dense_sum.items()}, self.n_tokens)


def _energy(h: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Σ‖x‖² over the real (unpadded) rows of hidden states ``h``."""
    rows = h.reshape(-1, h.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    return float((rows.float() ** 2).sum())


def _call_by_name(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A block's call arguments, except its first (the hidden states), as keywords of its forward."""
    if len(args) <= 1:  # the usual call: hidden states alone positionally
        return {k: v for k, v in kwargs.items() if k != "hidden_states"}
    params = inspect.signature(module.forward).parameters
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names) or any(params[n].kind is params[n].POSITIONAL_ONLY for n in names[1:len(args)]):
        raise TypeError(f"{type(module).__name__}: cannot replay its positional arguments by name")
    named = dict(zip(names, args))
    named.update(kwargs)
    named.pop(names[0])
    return named


def _module_of(proj) -> nn.Module:
    """The real module behind an adapter's projection (a ``LinearView`` wraps one)."""
    return getattr(proj, "module", proj)


def _same_submodule(block: nn.Module, twin: nn.Module, module: nn.Module) -> nn.Module:
    """``module`` (inside ``block``) found at the same path in ``twin`` (a copy of ``block``)."""
    for name, m in block.named_modules():
        if m is module:
            return twin.get_submodule(name)
    raise ValueError("projection not found in its block")


def merge_stats(*parts: list[BlockStats]) -> list[BlockStats]:
    """Per-block merge of several lists of statistics (e.g. one per shard of the calibration windows)."""
    if len({len(p) for p in parts}) != 1:
        raise ValueError("cannot merge statistics of models with different numbers of blocks")
    merged = []
    for blocks in zip(*parts):
        total = blocks[0]
        for b in blocks[1:]:
            total = total.merge(b)
        merged.append(total)
    return merged


@dataclass
class SensitivitySums:
    """Unnormalised gradient second moments: ``fisher[i][kind] = Σ_t g_t g_tᵀ`` (float64) over
    ``n_tokens`` real tokens. Sums merge and all-reduce exactly; :meth:`normalised` divides once."""

    fisher: list[dict[str, torch.Tensor]]
    n_tokens: int

    def merge(self, other: "SensitivitySums") -> "SensitivitySums":
        if len(self.fisher) != len(other.fisher):
            raise ValueError("cannot merge sensitivities of models with different numbers of blocks")
        return SensitivitySums([{k: f[k] + g[k].to(f[k].device) for k in f} for f, g in zip(self.fisher, other.fisher)],
                               self.n_tokens + other.n_tokens)

    __add__ = merge

    def normalised(self) -> list[dict[str, torch.Tensor]]:
        """Per-token second moments ``Σ_t g_t g_tᵀ / n_tokens`` (what :func:`output_sensitivity` returns)."""
        if self.n_tokens <= 0:
            raise ValueError("the sensitivity pass saw no tokens; give it at least one calibration window")
        return [{k: v / self.n_tokens for k, v in f.items()} for f in self.fisher]


STATS_FORMAT = "stat-calibration-statistics"
STATS_VERSION = "1"


def save_stats(path, stats: list[BlockStats], sensitivity: SensitivitySums | None = None, *,
               extra_tensors: dict[str, torch.Tensor] | None = None, extra_metadata: dict[str, str] | None = None
               ) -> Path:
    """Write the per-block statistics (and optionally the sensitivity sums) to one safetensors file.

    Tensors ``{i}.attn_gram``, ``{i}.mlp_gram``, ``{i}.attn_sum``, ``{i}.mlp_sum`` (float64, as
    accumulated), ``n_tokens: (n_blocks,)`` int64 and ``resid_energy: (n_blocks,)`` float64, and with
    a sensitivity ``{i}.fisher_attn``/``{i}.fisher_mlp`` and ``sensitivity_n_tokens``; the metadata
    names the format, its version and the block count. Loading gives back the same numbers bit for bit.
    ``extra_tensors`` / ``extra_metadata``: more entries stored beside them (names prefixed ``extra.``,
    read back by :func:`read_stats_file`), e.g. the calibration cache's fingerprint and analyses.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    with_sums = all(s.attn_sum is not None and s.mlp_sum is not None for s in stats)
    for i, s in enumerate(stats):
        tensors[f"{i}.attn_gram"] = s.attn_gram
        tensors[f"{i}.mlp_gram"] = s.mlp_gram
        if with_sums:
            tensors[f"{i}.attn_sum"] = s.attn_sum
            tensors[f"{i}.mlp_sum"] = s.mlp_sum
    tensors["n_tokens"] = torch.tensor([s.n_tokens for s in stats], dtype=torch.int64)
    tensors["resid_energy"] = torch.tensor([s.resid_energy for s in stats], dtype=torch.float64)
    if sensitivity is not None:
        if len(sensitivity.fisher) != len(stats):
            raise ValueError(f"{len(sensitivity.fisher)} sensitivity blocks for {len(stats)} blocks of statistics")
        for i, f in enumerate(sensitivity.fisher):
            tensors[f"{i}.fisher_attn"] = f["attn"]
            tensors[f"{i}.fisher_mlp"] = f["mlp"]
        tensors["sensitivity_n_tokens"] = torch.tensor([sensitivity.n_tokens], dtype=torch.int64)
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {f"extra.{k}": v for k, v in (extra_metadata or {}).items()}
    meta.update({"format": STATS_FORMAT, "version": STATS_VERSION, "num_blocks": str(len(stats)),
                 "column_sums": json.dumps(with_sums), "sensitivity": json.dumps(sensitivity is not None)})
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_stats(path) -> tuple[list[BlockStats], SensitivitySums | None]:
    """``(statistics, sensitivity sums or None)`` from a file written by :func:`save_stats` (on CPU)."""
    stats, sensitivity, _, _ = read_stats_file(path)
    return stats, sensitivity


def read_stats_file(path) -> tuple[list[BlockStats], SensitivitySums | None, dict[str, torch.Tensor], dict[str, str]]:
    """:func:`load_stats` plus the ``extra_tensors`` and ``extra_metadata`` :func:`save_stats` stored
    (their own names). ValueError with one sentence for a missing, foreign, damaged or truncated file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no statistics file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATS_FORMAT:
                raise ValueError(f"{path} is not a STAT statistics file (written by stat_core.calibration.statistics.save_stats)")
            if meta.get("version") != STATS_VERSION:
                raise ValueError(f"{path} has statistics format version {meta.get('version')}, "
                                 f"this version reads {STATS_VERSION}")
            t = {k: f.get_tensor(k) for k in f.keys()}
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own errors for a damaged or foreign file
        raise ValueError(f"{path} could not be read as safetensors ({exc})") from exc
    try:
        n = int(meta["num_blocks"])
        sums = json.loads(meta["column_sums"])
        stats = [BlockStats(t[f"{i}.attn_gram"], t[f"{i}.mlp_gram"], int(t["n_tokens"][i]),
                            float(t["resid_energy"][i]), t[f"{i}.attn_sum"] if sums else None,
                            t[f"{i}.mlp_sum"] if sums else None) for i in range(n)]
        sensitivity = None
        if json.loads(meta["sensitivity"]):
            sensitivity = SensitivitySums([{"attn": t[f"{i}.fisher_attn"], "mlp": t[f"{i}.fisher_mlp"]}
                                           for i in range(n)], int(t["sensitivity_n_tokens"][0]))
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is an incomplete statistics file ({type(exc).__name__}: {exc})") from exc
    extra_t = {k[len("extra."):]: v for k, v in t.items() if k.startswith("extra.")}
    extra_m = {k[len("extra."):]: v for k, v in meta.items() if k.startswith("extra.")}
    return stats, sensitivity, extra_t, extra_m


class LayerwiseRunner:
    """Holds the calibration hidden states and runs single blocks over them.

    ``windows: (n, T)`` token ids without padding (calibration windows are cut from running text).
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, windows, batch_size: int = 8):
        self.model = model
        self.adapter = adapter
        self.device = next(model.parameters()).device
        data = CalibrationSet.wrap(windows)
        self.batches = list(data.batches(batch_size))
        # Padded batches (encoders) carry their own masks: each block then gets the call arguments
        # block 0 got for that batch (all blocks of these families see the same mask). Unpadded
        # windows (decoders) share one set of per-block arguments captured from a single window.
        self.per_batch_args = data.attention_mask is not None
        self.layer_kwargs = None if self.per_batch_args else self._capture_layer_kwargs(data.input_ids[:1])
        self.batch_args: list[tuple[tuple, dict]] = []
        self.hidden = self._embed_all()

    def _model_inputs(self, batch: CalibrationSet) -> dict:
        inputs = batch.model_inputs(self.device)
        if self.adapter.is_decoder:
            inputs["use_cache"] = False
        return inputs

    def token_mask(self, index: int) -> torch.Tensor | None:
        mask = self.batches[index].attention_mask
        return None if mask is None else mask.to(self.device).bool()

    @torch.no_grad()
    def _capture_layer_kwargs(self, one_window: torch.Tensor) -> list[dict]:
        """Arguments (masks, rotary embeddings) each block receives besides its hidden states, from
        one window, all by name: positional ones too (GPT-2 passes its causal mask positionally,
        which under ``eager`` attention is the only causality there is).

        They depend on the sequence length, not on the content, and broadcast over the batch, so a
        one-window forward serves every batch. Gemma-3 gives sliding and global blocks different
        ones, hence one dict per block.
        """
        captured: list[dict | None] = [None] * self.adapter.num_layers

        def make_hook(idx):
            def hook(module, args, kwargs):
                captured[idx] = _call_by_name(module, args, kwargs)
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
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            out.append(hidden)
            if self.per_batch_args:
                self.batch_args.append((tuple(args[1:]), kwargs))
            raise _StopForward

        handle = self.adapter.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in self.batches:
                try:
                    self.model(**self._model_inputs(batch))
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return out

    @torch.no_grad()
    def run_block(self, layer: int, hidden: list[torch.Tensor], adapter: ModelAdapter | None = None
                  ) -> list[torch.Tensor]:
        """Outputs of block ``layer`` (of ``adapter``'s model, default the runner's) on ``hidden``."""
        outs = []
        for i, h in enumerate(hidden):
            outs.append(self._run_one(layer, i, h, adapter))
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
        current = {"mask": None}  # padding mask of the batch being run
        handles = [attn_proj.register_forward_pre_hook(lambda _m, args: attn_acc.add(args[0], current["mask"])),
                   mlp_proj.register_forward_pre_hook(lambda _m, args: mlp_acc.add(args[0], current["mask"]))]
        outs = []
        energy = 0.0
        try:
            for i, h in enumerate(hidden):
                current["mask"] = self.token_mask(i)
                outs.append(self._run_one(layer, i, h, adapter))
                energy += _energy(h, current["mask"])
        finally:
            for handle in handles:
                handle.remove()
        # Statistics leave the model's device once the block is done (they are kept for every block).
        stats = BlockStats(attn_acc.gram, mlp_acc.gram, attn_acc.n_rows, energy, attn_acc.col_sum, mlp_acc.col_sum)
        return stats.to("cpu"), outs

    @torch.no_grad()
    def collect_paired(self, layer: int, hidden: list[torch.Tensor], dense_hidden: list[torch.Tensor],
                       dense_block: nn.Module, kinds: tuple[str, ...] = ("attn", "mlp")
                       ) -> tuple[BlockStats, "PairedStats", list[torch.Tensor]]:
        """Block ``layer`` as it is now (perhaps partly pruned) on the pruned path's ``hidden`` and the
        untouched ``dense_block`` on the dense path's ``dense_hidden``, batch by batch side by side.

        Returns the pruned path's statistics, the cross products with the dense path
        (:class:`PairedStats`, for the block ``kinds`` only: the others may already be cut) and the
        dense block's outputs (the dense path's next hidden states).
        """
        adapter = self.adapter
        projs = {"attn": adapter.attn_out_proj(layer), "mlp": adapter.mlp_out_proj(layer)}
        accs = {k: GramAccumulator(p.in_features, self.device) for k, p in projs.items()}
        cross = {k: torch.zeros(projs[k].in_features, projs[k].in_features, dtype=torch.float64) for k in kinds}
        dense_sum = {k: torch.zeros(projs[k].in_features, dtype=torch.float64) for k in kinds}
        block = adapter.layers[layer]
        dense_projs = {k: _same_submodule(block, dense_block, _module_of(projs[k])) for k in kinds}
        seen: dict[str, torch.Tensor] = {}
        current = {"mask": None}

        def keep_dense(kind):
            return lambda _m, args: seen.__setitem__(kind, args[0].detach())

        def add_pruned(kind):
            def hook(_m, args):
                z = args[0].detach()
                accs[kind].add(z, current["mask"])
                if kind not in kinds:
                    return
                zp, zd = z.reshape(-1, z.shape[-1]), seen.pop(kind).reshape(-1, z.shape[-1])
                if current["mask"] is not None:
                    rows = current["mask"].reshape(-1)
                    zp, zd = zp[rows], zd[rows]
                cross[kind] += (zp.float().T @ zd.float()).to("cpu", torch.float64)
                dense_sum[kind] += zd.to(torch.float64).sum(0).cpu()
            return hook

        handles = [dense_projs[k].register_forward_pre_hook(keep_dense(k)) for k in kinds]
        handles += [_module_of(projs[k]).register_forward_pre_hook(add_pruned(k)) for k in projs]
        dense_outs = []
        energy = 0.0
        try:
            for i, (h, hd) in enumerate(zip(hidden, dense_hidden)):
                current["mask"] = self.token_mask(i)
                dense_outs.append(self._run_module(dense_block, layer, i, hd))
                self._run_one(layer, i, h, None)
                energy += _energy(h, current["mask"])
        finally:
            for handle in handles:
                handle.remove()
        a, m = accs["attn"], accs["mlp"]
        stats = BlockStats(a.gram, m.gram, a.n_rows, energy, a.col_sum, m.col_sum).to("cpu")
        return stats, PairedStats(cross, dense_sum, a.n_rows), dense_outs

    def _run_module(self, block: nn.Module, layer: int, index: int, h: torch.Tensor) -> torch.Tensor:
        if self.per_batch_args:
            args, kwargs = self.batch_args[index]
            o = block(h, *args, **kwargs)
        else:
            o = block(h, **self.layer_kwargs[layer])
        return o[0] if isinstance(o, tuple) else o

    def _run_one(self, layer: int, index: int, h: torch.Tensor, adapter: ModelAdapter | None) -> torch.Tensor:
        return self._run_module((adapter or self.adapter).layers[layer], layer, index, h)


def _classifier_fisher_backward(logits: torch.Tensor) -> None:
    """Backward passes whose gradient outer products sum to the classifier's Fisher information,
    ``Σ_c p_c ∇log p_c ∇log p_cᵀ`` (one pass per class, each weighted by ``√p_c``).

    The model's own predictive distribution, not the labels: a well-trained classifier is confident
    and right on its calibration data, so label gradients are tiny except on the few examples it
    gets wrong, and those would dominate an empirical Fisher.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    weight = log_p.detach().exp().sqrt()
    n_classes = logits.shape[-1]
    for c in range(n_classes):
        (weight[:, c] * log_p[:, c]).sum().backward(retain_graph=c < n_classes - 1)


def output_sensitivity(model: nn.Module, adapter: ModelAdapter, windows, batch_size: int = 4,
                       labels: str = "data") -> list[dict[str, torch.Tensor]]:
    """Second moments of the loss gradient at each block's attention and MLP output.

    For every block, ``F = Σ_t g_t g_tᵀ / n_tokens`` (``(d, d)`` float64) with ``g_t`` the gradient of
    the summed loss with respect to that block's output-projection output at token t (next-token
    loss for decoders; for classifiers, the Fisher of the model's own class distribution, see
    ``_classifier_fisher_backward``). A perturbation ``δ_t`` there
    changes the loss by about ``½ Σ_t (g_tᵀ δ_t)²`` (empirical Fisher), so ``F`` turns each block's
    output residual into a loss estimate comparable across blocks: this is how the allocator
    accounts for error propagation through the later layers.

    Decoders, ``labels="model"``: the next tokens are sampled from the model's own predictive
    distribution instead of read from the text (one sample per position, seeded by the window's
    index), which makes ``F`` an unbiased estimate of the Fisher information, the curvature of the
    KL divergence to the dense model, rather than the empirical Fisher of the text's loss.

    The unnormalised sums (to merge or all-reduce before dividing) come from :func:`sensitivity_sums`.
    """
    return sensitivity_sums(model, adapter, windows, batch_size, labels).normalised()


@contextlib.contextmanager
def recomputed_blocks(layers: nn.ModuleList):
    """Inside the ``with``, each transformer block keeps only its inputs for the backward pass and
    recomputes its activations there (non-reentrant ``torch.utils.checkpoint``): the gradient pass
    then holds one block's activations instead of every block's (on SmolLM2 at 4 × 512 tokens,
    about 3.5 GB of attention probabilities and MLP intermediates). The gradients are the same; the
    forward hooks of the sensitivity pass fire on the first forward, whose outputs are the ones the
    backward pass runs through (tested: ``test_recomputed_blocks_give_the_same_sensitivity``)."""
    from torch.utils.checkpoint import checkpoint

    saved = []
    for block in layers:
        saved.append((block, block.__dict__.get("forward")))
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    try:
        yield
    finally:
        for block, own in saved:
            if own is None:
                del block.forward
            else:
                block.forward = own


def sensitivity_sums(model: nn.Module, adapter: ModelAdapter, windows, batch_size: int = 4,
                     labels: str = "data", first_index: int = 0, memory_savers: bool = True,
                     progress=None) -> SensitivitySums:
    """The sums behind :func:`output_sensitivity`, on CPU: ``Σ_t g_t g_tᵀ`` per block and kind, and
    the number of real tokens. ``first_index``: the global index of ``windows``' first row when they
    are one shard of a larger set; model-sampled labels are seeded per global window index, so the
    sums of the shards add up to the sums of the whole set whatever the sharding or batching. An
    empty ``windows`` gives zero sums over zero tokens. ``progress(stage, done, total)``: after each
    batch, ``("sensitivity", windows done, windows)``. ``memory_savers`` (the default): each block's
    activations recomputed in the backward pass and the cross-entropy taken in chunks, so the peak holds
    one block and one chunk of log-probabilities; off, everything is kept (faster, far more memory; the
    sums agree to float rounding)."""
    if labels not in ("data", "model"):
        raise ValueError(f"labels must be 'data' or 'model', got {labels!r}")
    data = CalibrationSet.wrap(windows)
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
                fisher[idx][kind] += (g.T @ g).to(torch.float64)  # padding rows have zero gradient
            output.register_hook(grad_hook)
        return fwd_hook

    for i in range(adapter.num_layers):
        handles.append(adapter.attn_out_proj(i).register_forward_hook(make_hook(i, "attn")))
        handles.append(adapter.mlp_out_proj(i).register_forward_hook(make_hook(i, "mlp")))
    requires = [p.requires_grad for p in model.parameters()]
    offset = first_index
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with recomputed_blocks(adapter.layers) if memory_savers else contextlib.nullcontext():
            offset, n_tokens = _sensitivity_batches(model, adapter, data, batch_size, labels, device, offset,
                                                    chunked_cross_entropy if memory_savers else _plain_cross_entropy,
                                                    progress)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return SensitivitySums([{k: v.cpu() for k, v in f.items()} for f in fisher], n_tokens)


def _sensitivity_batches(model, adapter, data, batch_size, labels, device, offset, cross_entropy, progress=None):
    """The backward passes of :func:`sensitivity_sums` (its hooks collect the sums); returns the
    next window index and the number of real tokens seen."""
    n_tokens = 0
    first = offset
    for batch in data.batches(batch_size):
        ids = batch.input_ids.to(device)
        # Gradients flow from the loss to the hooked activations; weights stay frozen. (Gemma's
        # embedding module applies its scale itself, so inputs_embeds equals input_ids.)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        kwargs = {"inputs_embeds": emb}
        if batch.attention_mask is not None:
            kwargs["attention_mask"] = batch.attention_mask.to(device)
        if adapter.is_decoder:
            logits = model(**kwargs, use_cache=False).logits
            n, t, vocab = logits.shape
            target = ids[:, 1:]
            if labels == "model":
                target = _sample_own_labels(logits[:, :-1].reshape(-1, vocab), n, offset).to(device).view(n, t - 1)
                if batch.attention_mask is not None:  # padding positions stay out of the loss
                    target = target.masked_fill(batch.attention_mask[:, 1:].to(device) == 0, -100)
            # The last position predicts nothing; the logits are read in place (no shifted copy).
            target = torch.cat([target, target.new_full((n, 1), -100)], 1).reshape(-1)
            cross_entropy(logits.view(-1, vocab), target).backward()
        else:
            _classifier_fisher_backward(model(**kwargs).logits)
        n_tokens += int(batch.attention_mask.sum()) if batch.attention_mask is not None else ids.numel()
        offset += len(ids)
        if progress is not None:
            progress("sensitivity", offset - first, len(data))
    return offset, n_tokens


def _plain_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (−100: ignored) over all rows at once: three ``N × V`` tensors kept."""
    return nn.functional.cross_entropy(logits.float(), target, reduction="sum", ignore_index=-100)


def chunked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed cross-entropy of ``logits: (N, V)`` against ``target: (N,)`` (−100: ignored), in row
    chunks whose float32 log-probabilities are recomputed in the backward pass instead of kept: the
    peak holds one chunk's ``chunk × V`` instead of three ``N × V`` tensors (49k-token vocabulary ×
    2,048 positions: 400 MB each)."""
    from torch.utils.checkpoint import checkpoint

    def part(x, y):
        return nn.functional.cross_entropy(x.float(), y, reduction="sum", ignore_index=-100)

    total = logits.new_zeros((), dtype=torch.float32)
    for s in range(0, logits.shape[0], chunk):
        total = total + checkpoint(part, logits[s:s + chunk], target[s:s + chunk], use_reentrant=False)
    return total


@torch.no_grad()
def _sample_own_labels(flat_logits: torch.Tensor, n_windows: int, first_index: int) -> torch.Tensor:
    """One next token per position sampled from the model's distribution, ``flat_logits: (n_windows ·
    (T − 1), V)``; window ``j`` of the batch draws from a generator seeded with ``first_index + j``."""
    probs = torch.softmax(flat_logits, -1).cpu().view(n_windows, -1, flat_logits.shape[-1])
    return torch.cat([torch.multinomial(probs[j], 1, generator=torch.Generator().manual_seed(first_index + j)).view(-1)
                      for j in range(n_windows)])
