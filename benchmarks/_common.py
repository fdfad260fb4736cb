"""Shared helpers of the benchmark scripts: result files, tiny random models, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine_note() -> dict:
    """Where a number was measured. The project's CPU box is shared (2 cores, other jobs running):
    absolute times are noisy, which is why every timing is taken side by side and reported as a ratio."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "load_average": load,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def load_at_start(meta: dict) -> str:
    """The 1-minute load average recorded in ``machine_note``, for the markdown tables."""
    load = meta["machine"].get("load_average")
    return f"{load[0]:.1f}" if load else "?"


def write_results(out_dir: Path, name: str, payload: dict, markdown: str) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (out_dir / f"{name}.md").write_text(markdown)


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               d_ff: int = 64, vocab: int = 128):
    """A random Llama (no downloads) for smoke runs and the width scan of the cost benchmark."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=d_ff, vocab_size=vocab,
                      max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(cfg).eval()


def random_windows(n: int, seq_len: int, vocab: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=gen)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def forward_seconds(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """One plain forward pass (with the LM head) over ``windows``: the floor any data-driven pruning pays."""
    from stat_core.adapters import get_adapter
    from stat_core.calibration.statistics import CalibrationSet

    device = next(model.parameters()).device
    extra = {"use_cache": False} if get_adapter(model).is_decoder else {}
    sync(device)
    t = time.perf_counter()
    for batch in CalibrationSet.wrap(windows).batches(batch_size):
        model(**batch.model_inputs(device), **extra)
    sync(device)
    return time.perf_counter() - t


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def svg_line_plot(series: dict, path: Path, title: str, xlabel: str, ylabel: str, hline: float | None = None,
                  hline_label: str = "", log_y: bool = True, width: int = 760, height: int = 440) -> None:
    """A dependency-free static SVG line plot (the README shows it; plotly's HTML needs a browser and
    kaleido is not installed). ``series``: ``{name: [(x, y), ...]}``; x as fractions (shown in %)."""
    import math

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    ml, mr, mt, mb = 70, 170, 40, 50
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts] + ([hline] if hline else [])
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    step = 0.1 if max(xs) > 0.3 else 0.05
    x0, x1 = 0.0, (math.floor(max(xs) / step) + 1) * step
    y0, y1 = math.floor(f(min(ys))), math.ceil(f(max(ys)))
    if y1 == y0:
        y1 = y0 + 1

    def px(x):
        return ml + (x - x0) / (x1 - x0) * (width - ml - mr)

    def py(y):
        return height - mb - (f(y) - y0) / (y1 - y0) * (height - mt - mb)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    for e in range(int(y0), int(y1) + 1) if log_y else []:
        y = 10 ** e
        out.append(f'<line x1="{ml}" x2="{width - mr}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{ml - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for i in range(int(round(x1 / step)) + 1):
        x = i * step
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{mt}" y2="{height - mb}" stroke="#eee"/>')
        out.append(f'<text x="{px(x):.1f}" y="{height - mb + 16}" text-anchor="middle">{x:.0%}</text>')
    out.append(f'<rect x="{ml}" y="{mt}" width="{width - ml - mr}" height="{height - mt - mb}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{(ml + width - mr) / 2}" y="{height - 12}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="16" y="{(mt + height - mb) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(mt + height - mb) / 2})">{ylabel}</text>')
    if hline:
        out.append(f'<line x1="{ml}" x2="{width - mr}" y1="{py(hline):.1f}" y2="{py(hline):.1f}" stroke="#333" '
                   'stroke-dasharray="6 4"/>')
        out.append(f'<text x="{width - mr + 6}" y="{py(hline) + 4:.1f}">{hline_label}</text>')
    for i, (name, pts) in enumerate(series.items()):
        c = colors[i % len(colors)]
        pts = sorted(pts)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts) + '"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>' for x, y in pts]
        ly = mt + 20 + 18 * i
        out.append(f'<line x1="{width - mr + 8}" x2="{width - mr + 28}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{width - mr + 32}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    Path(path).write_text("\n".join(out))
