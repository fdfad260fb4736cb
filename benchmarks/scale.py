"""What pruning costs as models grow: time and memory of a STAT prune of random-weight models with
real shapes (Llama-2-7B, Llama-3.2-1B, SmolLM2-135M) and of a width ladder, on CPU or a GPU.

Random weights measure cost, not quality: the plans these runs make mean nothing, the seconds and
bytes do (the work of calibration, decompositions and surgery depends on shapes, not values). The
calibration windows are random token ids for the same reason (no tokenizer or text is needed).

Every record runs in its own process, so its peak resident memory (``ru_maxrss``) and peak GPU
memory are its own. Records (``benchmarks/results/scale.json``, a list): ``shape``, ``params``,
``model_bytes`` (the weights' bytes at ``dtype``: what a safetensors file of them holds),
``peak_rss_bytes`` (measured), ``peak_gpu_bytes`` (measured, GPU only), ``calibration_tokens``,
``seconds`` (end to end: model build excluded, calibration + sensitivity + decompositions +
allocation + surgery included), the stage timings, ``seconds_per_block``, ``device``, ``dtype``.
Then the fitted exponents: seconds ∝ tokens^a (one shape, growing calibration) and ∝ width^b
(the width ladder: 4 blocks, hidden 1024 → 4096 with Llama-2's MLP ratio).

    python -m benchmarks.scale --device cuda --dtype bfloat16 --shapes llama-2-7b --num-samples 512
    python -m benchmarks.scale --device cpu --shapes smollm2-135m,width-1024 --num-samples 8 --seq-len 256

``--offload``: the layer-streaming prune (:mod:`stat_core.streaming`). The random model is first
written once as bf16 safetensors shards (``--checkpoint-dir``, reused by later runs; written
tensor by tensor, never whole in memory), then a child process prunes it block by block and
exports the pruned model (to a temporary folder, deleted after); ``model_bytes`` is then the
checkpoint's size on disk and ``peak_rss_bytes`` the child's measured peak (its VmHWM; a child's
``ru_maxrss`` would also count the parent's memory at fork), which includes the interpreter, the
calibration hidden states, one block and its float64 statistics; ``peak_rss_after_embed_bytes`` is
the peak from the first block on (VmHWM reset once the embeddings are made and dropped).
No gradient sensitivity pass in streaming mode.

    nice -n 19 python -m benchmarks.scale --offload --shapes llama-3.2-1b,llama-2-7b --num-samples 8 --seq-len 256

``--blocks N`` (with ``--offload``): a partial run where a whole one takes too long (a 7B shape on
two cores is hours): the full checkpoint is still written, and the prune streams a view of it cut
to its first N blocks (same config otherwise; shards linked, not copied), end to end (both passes
and the export). The record says ``"partial": "N of L blocks"``; ``model_bytes`` and ``params``
stay the full model's (the full checkpoint on disk), ``seconds`` is the N-block run's. The
streamed peak does not grow with depth (one block at a time), but it is measured on N blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "scale.json"
CHECKPOINTS = Path(os.environ.get("TMPDIR", "/tmp")) / "stat-scale-checkpoints"
SHARD_BYTES = 2 * 2**30

SHAPES = {
    # Llama-2-7B (meta-llama/Llama-2-7b-hf config.json)
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    # Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json; its 128k vocabulary dominates the embedding)
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                         tie_word_embeddings=True, rope_theta=500000.0),
    # SmolLM2-135M (the demo model's shape)
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
}
# The width ladder: Llama-2's proportions (head_dim 128, MLP 2.6875×), 4 blocks, 32k vocabulary.
for _w in (1024, 2048, 4096):
    SHAPES[f"width-{_w}"] = dict(hidden_size=_w, num_hidden_layers=4, num_attention_heads=_w // 128,
                                 num_key_value_heads=_w // 128, intermediate_size=int(_w * 2.6875),
                                 vocab_size=32000, max_position_embeddings=4096)


def run_one(shape: str, device: str, dtype: str, num_samples: int, seq_len: int, sparsity: float,
            batch_size: int, sensitivity_samples: int | None) -> dict:
    """Build the random model, prune it once, return the record (this process's peaks)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from stat_core.config import PruneConfig
    from stat_core.pipeline import stat_prune_

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    dev = torch.device(device)
    config = LlamaConfig(**SHAPES[shape])
    t = time.perf_counter()
    with dev:
        model = AutoModelForCausalLM.from_config(config, dtype=dt).eval()
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, config.vocab_size, (num_samples, seq_len), generator=g)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stages: dict[str, float] = {}

    def progress(stage, done, total):
        if done >= total:
            print(f"  {shape}: {stage} done", file=sys.stderr, flush=True)

    cfg = PruneConfig(sparsity=sparsity, batch_size=batch_size, sensitivity_samples=sensitivity_samples)
    t = time.perf_counter()
    result = stat_prune_(model, windows, cfg, model_name=shape, progress=progress)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    stages = {k: round(v, 3) for k, v in result.timings.items()}
    record = {
        "shape": shape, "params": params, "model_bytes": model_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "calibration_tokens": num_samples * seq_len, "num_samples": num_samples, "seq_len": seq_len,
        "seconds": round(seconds, 3), "seconds_per_block": round(stages.get("calibrate", seconds) / config.num_hidden_layers, 4),
        "stages": stages, "build_seconds": round(build_s, 2), "sparsity": sparsity,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dtype": dtype, "torch": torch.__version__,
    }
    if dev.type == "cuda":
        record["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
    return record


def write_checkpoint(shape: str, dtype: str, root: Path) -> Path:
    """The random-weight model of ``shape`` as ``dtype`` safetensors shards under ``root`` (written
    once; an existing complete folder is reused). Tensor by tensor from a ``meta`` skeleton: norms
    are ones, everything else N(0, 0.02²), seeded per tensor; at most one shard in memory."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = root / f"{shape}-{dtype}"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    tmp = root / f".{shape}-{dtype}-partial"
    tmp.mkdir(parents=True, exist_ok=True)
    dt = getattr(torch, dtype)
    config = LlamaConfig(**SHAPES[shape])
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dt)
    skeleton.tie_weights()
    params = list(skeleton.named_parameters())  # tied ones once, as save_pretrained writes them
    shards: list[dict] = [{}]
    size = 0
    for name, p in params:
        if size + p.numel() * p.element_size() > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = p
        size += p.numel() * p.element_size()
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for j, (name, p) in enumerate(shard.items()):
            if p.dim() == 1:
                tensors[name] = torch.ones(p.shape, dtype=dt)
            else:
                g = torch.Generator().manual_seed(hash((i, j)) % 2**31)
                tensors[name] = (torch.randn(p.shape, generator=g) * 0.02).to(dt)
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    config.dtype = dtype
    config.save_pretrained(tmp)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    os.replace(tmp, folder)
    return folder


def partial_view(full: Path, n_blocks: int) -> Path:
    """A checkpoint folder that is ``full`` cut to its first ``n_blocks`` blocks: its config says
    ``num_hidden_layers = n_blocks``, its index names only the tensors outside the blocks and those
    of the first blocks, and its shards are links to ``full``'s (nothing copied)."""
    import re

    folder = full.parent / f"{full.name}-first{n_blocks}"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(exist_ok=True)
    config = json.loads((full / "config.json").read_text())
    config["num_hidden_layers"] = n_blocks
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    index = json.loads((full / "model.safetensors.index.json").read_text())
    block = re.compile(r"\.layers\.(\d+)\.")
    weight_map = {k: f for k, f in index["weight_map"].items()
                  if (m := block.search(k)) is None or int(m.group(1)) < n_blocks}
    for f in set(weight_map.values()):
        if not (folder / f).exists():
            os.symlink(full / f, folder / f)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _vm_hwm() -> int | None:
    """This process's peak resident memory since the last :func:`_reset_hwm` (Linux VmHWM), bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
    except OSError:
        pass


def full_params(shape: str) -> int:
    """Parameters of the whole ``shape`` (tied ones once), counted on a ``meta`` skeleton."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]))
    model.tie_weights()
    return sum(p.numel() for p in model.parameters())


def run_offload(shape: str, checkpoint: Path, num_samples: int, seq_len: int, sparsity: float,
                batch_size: int, compute_dtype: str = "float32", blocks: int | None = None) -> dict:
    """Streamed prune + export of the checkpoint (or of its first ``blocks`` blocks), in this
    process; the record (this process's peak)."""
    import shutil
    import tempfile

    import torch

    from stat_core.config import PruneConfig
    from stat_core.streaming import streamed_prune

    full = checkpoint
    model_bytes = sum(p.stat().st_size for p in full.glob("*.safetensors"))
    n_layers = json.loads((full / "config.json").read_text())["num_hidden_layers"]
    if blocks is not None and blocks < n_layers:
        checkpoint = partial_view(full, blocks)
    else:
        blocks = None
    config = json.loads((checkpoint / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, config["vocab_size"], (num_samples, seq_len), generator=g)
    params = None
    t_start = time.perf_counter()
    events: list[dict] = []
    hwm_embed: list[int] = []  # VmHWM up to the embeddings (before its reset)

    def progress(stage, done, total):
        hwm = _vm_hwm()
        peak = max(hwm_embed + [hwm]) if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        events.append({"stage": stage, "done": done, "total": total,
                       "t": round(time.perf_counter() - t_start, 1), "peak_rss_bytes": peak})
        if hwm is not None and hwm_embed:
            events[-1]["peak_rss_since_embed_bytes"] = hwm
        if stage == "embed" and done >= total and hwm is not None:
            hwm_embed.append(hwm)
            _reset_hwm()  # from here VmHWM is the blocks' own peak
        if done >= total or stage in ("calibrate", "apply"):
            print(f"  {shape}: {stage} {done}/{total} at {events[-1]['t']:.0f} s (peak RSS so far "
                  f"{peak / 2**30:.2f} GiB)", file=sys.stderr, flush=True)

    cfg = PruneConfig(sparsity=sparsity, batch_size=batch_size, sensitivity_samples=0)
    out = Path(tempfile.mkdtemp(prefix="stat-scale-out-")) / "pruned"
    # Compute in float32 (a bfloat16 2048x2048x8192 product did not finish in 10 minutes on this
    # 2-core CPU; float32 runs at ~40 GFLOPS), write the export in the checkpoint's dtype.
    compute = getattr(torch, compute_dtype)
    stored = getattr(torch, config.get("dtype", "bfloat16"))
    try:
        t = time.perf_counter()
        result = streamed_prune(checkpoint, windows, cfg, out, progress=progress, model_name=shape, dtype=compute,
                                save_dtype=stored)
        seconds = time.perf_counter() - t
        hwm_end = _vm_hwm()
        out_bytes = result.export.size_bytes
        params = result.info["sizes_before"]["params"] if blocks is None else full_params(shape)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    stages = {k: round(v, 3) for k, v in result.timings.items()}
    # The peak is this process's VmHWM (its own address space since exec), not ru_maxrss: on Linux a
    # child's ru_maxrss also counts the parent's resident memory at fork (here: the parent that wrote
    # the checkpoint), which is not the prune's.
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = max(hwm_embed + [hwm_end]) if hwm_end is not None else ru_maxrss
    record = {
        "shape": shape, "params": params, "model_bytes": model_bytes,
        "peak_rss_bytes": peak, "peak_rss_measure": "VmHWM" if hwm_end is not None else "ru_maxrss",
        "ru_maxrss_bytes": ru_maxrss,
        "calibration_tokens": num_samples * seq_len, "num_samples": num_samples, "seq_len": seq_len,
        "seconds": round(seconds, 3),
        "seconds_per_block": round((stages["calibrate"] + stages["analyse"] + stages["apply"])
                                   / config["num_hidden_layers"], 3),
        "stages": stages, "sparsity": sparsity, "pruned_bytes": out_bytes,
        "device": f"cpu ({os.cpu_count()} cores)", "dtype": config.get("dtype", "bfloat16"),
        "compute_dtype": compute_dtype,
        "torch": torch.__version__, "offload": True,
        "sensitivity": "skipped (streaming: residual-energy weighting)",
        "progress": events,
    }
    try:
        record["load_average"] = [round(x, 2) for x in os.getloadavg()]  # at the end: the CPU was shared
    except OSError:
        pass
    if hwm_end is not None:
        # the peak from the first block to the end (VmHWM reset once the embeddings were made and dropped)
        record["peak_rss_after_embed_bytes"] = hwm_end
    if blocks is not None:
        record.update(partial=f"{blocks} of {n_layers} blocks", blocks_run=blocks, num_hidden_layers=n_layers,
                      params_run=result.info["sizes_before"]["params"],
                      linked_shard_bytes=sum(p.stat().st_size for p in set((checkpoint / f).resolve()
                                          for f in json.loads((checkpoint / "model.safetensors.index.json")
                                                              .read_text())["weight_map"].values())),
                      note=f"partial run: the prune streamed the first {blocks} of {n_layers} blocks (both passes "
                           "and the export); model_bytes and params are the full checkpoint's; seconds are "
                           f"the {blocks}-block run's")
    return record


def fit_exponent(xs, ys) -> float | None:
    """Least-squares slope of log y on log x (None with fewer than two distinct x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)


def gib(b) -> str:
    return "—" if b is None else f"{b / 2**30:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2-135m", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-samples", default="8", help="calibration windows; comma-separated for a token ladder")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sensitivity-samples", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--append", action="store_true", help="add to the records already in --out")
    p.add_argument("--offload", action="store_true",
                   help="layer streaming (stat_core.streaming) from a bf16 safetensors checkpoint written once; CPU")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="--offload: dtype the blocks run in (the export keeps the checkpoint's dtype)")
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINTS), help="where --offload's random checkpoints live")
    p.add_argument("--blocks", type=int, default=None,
                   help="--offload: a partial run streaming only the first N blocks (labelled partial in the record)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: one record as JSON
    args = p.parse_args(argv)

    if args.one and args.offload:
        rec = run_offload(args.shapes, write_checkpoint(args.shapes, args.dtype, Path(args.checkpoint_dir)),
                          int(args.num_samples), args.seq_len, args.sparsity, args.batch_size, args.compute_dtype,
                          args.blocks)
        print("RECORD " + json.dumps(rec), flush=True)
        return 0
    if args.one:
        rec = run_one(args.shapes, args.device, args.dtype, int(args.num_samples), args.seq_len, args.sparsity,
                      args.batch_size, args.sensitivity_samples)
        print("RECORD " + json.dumps(rec), flush=True)
        return 0

    records = []
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.append and out.exists() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            p.error(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
        for n in args.num_samples.split(","):
            cmd = [sys.executable, "-m", "benchmarks.scale", "--one", "--shapes", shape, "--device", args.device, "--dtype", args.dtype,
                   "--num-samples", n, "--seq-len", str(args.seq_len), "--sparsity", str(args.sparsity),
                   "--batch-size", str(args.batch_size)]
            if args.sensitivity_samples is not None:
                cmd += ["--sensitivity-samples", str(args.sensitivity_samples)]
            if args.offload:  # the checkpoint is written here, so the child's peak is the prune's alone
                print(f"{shape}: writing the random {args.dtype} checkpoint (once) ...", file=sys.stderr, flush=True)
                write_checkpoint(shape, args.dtype, Path(args.checkpoint_dir))
                cmd += ["--offload", "--checkpoint-dir", args.checkpoint_dir, "--compute-dtype", args.compute_dtype]
                if args.blocks is not None:
                    cmd += ["--blocks", str(args.blocks)]
            print(f"{shape} × {n} windows of {args.seq_len} on {args.device} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECORD ")]
            if proc.returncode != 0 or not lines:
                print(f"  {shape} × {n}: failed (exit {proc.returncode})", file=sys.stderr)
                records.append({"shape": shape, "num_samples": int(n), "device": args.device, "error": proc.returncode})
                out.write_text(json.dumps(old + records, indent=1) + "\n")
                continue
            records.append(json.loads(lines[-1][len("RECORD "):]))
            print("  " + json.dumps(records[-1]), file=sys.stderr, flush=True)
            out.write_text(json.dumps(old + records, indent=1) + "\n")  # after each record: nothing lost


    print(f"{'shape':14} {'params':>8} {'weights GiB':>11} {'tokens':>7} {'seconds':>8} {'s/block':>8} "
          f"{'peak RSS GiB':>12} {'RSS/weights':>11} {'peak GPU GiB':>12}  device")
    for r in records:
        if "error" in r:
            print(f"{r['shape']:14} failed")
            continue
        print(f"{r['shape']:14} {r['params'] / 1e9:7.2f}B {gib(r['model_bytes']):>11} {r['calibration_tokens']:>7} "
              f"{r['seconds']:8.1f} {r['seconds_per_block']:8.2f} {gib(r['peak_rss_bytes']):>12} "
              f"{r['peak_rss_bytes'] / r['model_bytes']:11.2f} {gib(r.get('peak_gpu_bytes')):>12}  {r['device']}")
    ok = [r for r in records if "error" not in r]
    by_shape: dict[str, list] = {}
    for r in ok:
        by_shape.setdefault(r["shape"], []).append(r)
    for shape, rs in by_shape.items():
        a = fit_exponent([r["calibration_tokens"] for r in rs], [r["stages"].get("calibrate", r["seconds"]) for r in rs])
        if a is not None:
            print(f"calibration seconds ∝ tokens^{a:.2f} ({shape}, {len(rs)} sizes)")
    ladder = [r for r in ok if r["shape"].startswith("width-")]
    b = fit_exponent([SHAPES[r["shape"]]["hidden_size"] for r in ladder], [r["seconds"] for r in ladder])
    if b is not None:
        print(f"seconds ∝ width^{b:.2f} (width ladder, {len(ladder)} widths)")
    return 0 if len(ok) == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
