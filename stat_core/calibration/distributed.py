"""Calibration spread over processes (and machines) with ``torch.distributed``.

Every calibration statistic is a plain sum over tokens (Grams, column sums, token counts, residual
energies, gradient second moments), so each rank calibrates on its own shard of the windows and
the sums are all-reduced; normalisation happens once, after the reduction, exactly as in one
process. What runs where:

- every rank loads the model; rank 0 builds the calibration set and broadcasts it (:func:`from_main`),
  so all ranks shard the very same windows even when building them involves sampling or a cache;
- the sensitivity (gradient) pass and the layer-by-layer statistics run on each rank's shard
  (:func:`shard`); each block's statistics are all-reduced as soon as the block is done
  (:func:`all_reduce_stats`), the sensitivity sums once at the end (:func:`all_reduce_sensitivity`);
- one-shot: rank 0 analyses, plans, applies and exports; the other ranks stop after the
  calibration. Propagate: every block's statistics on the *pruned* path are needed by every rank
  to run the next block, so every rank applies the same (deterministic) plan layer by layer on its
  own copy, and rank 0 alone exports.

Backends: ``gloo`` on CPU, ``nccl`` when the model is on CUDA (one GPU per local rank). Launch with
``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`init_from_env` starts the process group from those variables. Without a process group (or
with one rank) every helper here is a no-op and the code is the one-process code.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from stat_core.calibration.statistics import BlockStats, CalibrationSet, SensitivitySums

# How long a rank waits for the others in one collective: rank 0 may spend a long time alone
# (building the calibration set, the dense evaluation) while the others wait in the next collective.
DEFAULT_TIMEOUT_MINUTES = 360


class PeerError(ValueError):
    """Another rank failed; that rank reports why (this one only stops)."""


def env_requests_distributed() -> bool:
    """True when launched by ``torchrun`` (or by hand) with ``WORLD_SIZE`` > 1 and a ``RANK``."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """A process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that plans, prints, evaluates and exports."""
    return rank() == 0


def backend_for(device) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: str = "auto") -> str:
    """Start the process group from torchrun's environment; return the device this rank should use.

    ``device``: the CLI's ``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``). On CUDA each rank
    takes GPU ``LOCAL_RANK`` (an explicit ``cuda:N`` is kept) and the backend is NCCL; on CPU, gloo.
    Returns ``device`` unchanged when the environment asks for no distribution.
    """
    if not env_requests_distributed() or is_distributed():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device == "cuda" or device.startswith("cuda:") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asks for CUDA but this machine has no usable GPU")
        if device in ("auto", "cuda"):
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                                 f"start at most {torch.cuda.device_count()} processes per node")
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    elif device == "auto":
        device = "cpu"
    minutes = float(os.environ.get("STAT_DIST_TIMEOUT_MINUTES", DEFAULT_TIMEOUT_MINUTES))
    dist.init_process_group(backend=backend_for(device), timeout=timedelta(minutes=minutes))
    return device


def shutdown() -> None:
    """Leave the process group (if one is running)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_shardable(n_windows: int, world: int | None = None) -> None:
    """ValueError (one sentence) when there are fewer calibration windows than ranks."""
    world = world_size() if world is None else world
    if world > 1 and n_windows < world:
        raise ValueError(f"{n_windows} calibration window{'s' if n_windows != 1 else ''} cannot be shared among "
                         f"{world} processes (each needs at least one): start at most {n_windows} "
                         f"process{'es' if n_windows != 1 else ''} or give more calibration windows (--num-samples)")


def shard_range(n: int, batch_size: int = 1, rank_: int | None = None, world: int | None = None,
                allow_empty: bool = False) -> tuple[int, int]:
    """``(start, stop)``: this rank's *contiguous* share of ``n`` windows.

    Whole batches of ``batch_size`` are dealt out when there are at least as many batches as
    ranks, so every rank runs exactly the batches one process would (the same per-batch float32
    products; only the float64 sums are added in another order); otherwise single windows are.
    Shares differ by at most one batch (one window). ``allow_empty``: with fewer windows than ranks,
    the last ranks get none instead of an error (the sensitivity pass may use fewer windows).
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not allow_empty:
        check_shardable(n, world)
    def bounds(total):  # ceil(r·total/world): earlier ranks get the larger shares
        return -(-rank_ * total // world), -(-(rank_ + 1) * total // world)

    n_batches = -(-n // max(batch_size, 1))
    if n_batches >= world:
        lo, hi = bounds(n_batches)
        return min(lo * batch_size, n), min(hi * batch_size, n)
    return bounds(n)


def shard(windows, batch_size: int = 1, allow_empty: bool = False) -> tuple[CalibrationSet, int]:
    """``(this rank's windows, index of its first window in the whole set)``; see :func:`shard_range`."""
    data = CalibrationSet.wrap(windows)
    start, stop = shard_range(len(data), batch_size, allow_empty=allow_empty)
    return data.take(slice(start, stop)), start


def _comm_device() -> torch.device:
    """Where collectives run: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-reduced (summed) copies of ``tensors`` on the CPU."""
    dev = _comm_device()
    out = []
    for t in tensors:
        buf = t.detach().to(dev, copy=True).contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out.append(buf.cpu())
    return out


def all_reduce_stats(stats: list[BlockStats]) -> list[BlockStats]:
    """Every rank's statistics summed over ranks (exact sums; on the CPU). Column sums must be
    present on every rank or on none."""
    if not is_distributed():
        return list(stats)
    out = []
    for s in stats:
        with_sums = s.attn_sum is not None and s.mlp_sum is not None
        scalars = torch.tensor([float(s.n_tokens), s.resid_energy], dtype=torch.float64)
        tensors = [s.attn_gram, s.mlp_gram, scalars] + ([s.attn_sum, s.mlp_sum] if with_sums else [])
        reduced = _sum_(tensors)
        out.append(BlockStats(reduced[0], reduced[1], int(round(float(reduced[2][0]))), float(reduced[2][1]),
                              reduced[3] if with_sums else None, reduced[4] if with_sums else None))
    return out


def all_reduce_paired(paired):
    """Cross products of the pruned and dense paths (:class:`~stat_core.calibration.statistics.PairedStats`)
    summed over ranks (exact sums; on the CPU)."""
    if not is_distributed():
        return paired
    kinds = sorted(paired.cross)
    tensors = [paired.cross[k] for k in kinds] + [paired.dense_sum[k] for k in kinds]
    reduced = _sum_(tensors + [torch.tensor([float(paired.n_tokens)], dtype=torch.float64)])
    return type(paired)(dict(zip(kinds, reduced[:len(kinds)])), dict(zip(kinds, reduced[len(kinds):-1])),
                        int(round(float(reduced[-1][0]))))


def all_reduce_sensitivity(sums: SensitivitySums) -> SensitivitySums:
    """The gradient second-moment sums and their token count summed over ranks (on the CPU)."""
    if not is_distributed():
        return sums
    flat = [t for f in sums.fisher for t in (f["attn"], f["mlp"])]
    reduced = _sum_(flat + [torch.tensor([float(sums.n_tokens)], dtype=torch.float64)])
    fisher = [{"attn": reduced[2 * i], "mlp": reduced[2 * i + 1]} for i in range(len(sums.fisher))]
    return SensitivitySums(fisher, int(round(float(reduced[-1][0]))))


def from_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` computed on rank 0 and broadcast to every rank (pickled).

    The other ranks do not call ``fn``. An exception on rank 0 is raised there; the other ranks
    raise :class:`PeerError` instead of waiting for a result that will not come.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    box: list = [None]
    failure = None
    if is_main():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # tell the others before raising here
            failure = exc
            box[0] = ("failed", f"{type(exc).__name__}: {exc}")
    device = _comm_device() if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    if failure is not None:
        raise failure
    status, payload = box[0]
    if status != "ok":
        raise PeerError(f"rank 0 stopped ({payload})")
    return payload
