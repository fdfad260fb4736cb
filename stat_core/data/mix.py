"""Calibration text that represents how a decoder is used: Wikipedia plus the model's own chat.

A chat model is used through its chat template: prompts, turns, instructions, short answers,
in-context examples. Wikipedia windows exercise none of that, so corrections and sensitivities fitted
on them alone need not preserve it. The *self-generated* source asks the dense model itself to
answer seed prompts written for this project (``assets/calibration_seed_prompts.json``, disjoint from
the evaluation suite's prompts) through its chat template, sampling its answers, and uses the full
transcripts (template tokens included) as calibration text. The ``mix`` source takes half of the
windows from that and half from Wikipedia's calibration split.

Measured on SmolLM2-135M-Instruct (``benchmarks/results/stat_ablation.md``): ``mix`` raises chat
agreement with the dense model by 7–10 points and cuts chat KL by a third at 20–30%, but Wikipedia
perplexity rises 15–25% and few-shot does not improve, so the default stays ``wikipedia``
(:func:`default_source`); ``mix`` is one option away in the CLI and the app.

Generation happens once per (model weights, seed prompts, generation settings) and is cached under
:func:`stat_core.paths.cache_dir` with that fingerprint; its time is reported separately from the
prune (``generation_seconds``; 0 on a cache hit).

    from stat_core.data.mix import decoder_calibration
    cal = decoder_calibration(model, tokenizer, "mix", CalibrationConfig())   # cal.windows, cal.info
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from stat_core.data.chat import (
    chat_prompt_ids,
    end_token_ids,
    has_chat_template,
    left_pad,
)
from stat_core.data.in_context import in_context_calibration
from stat_core.data.sources import (
    CalibrationConfig,
    DataError,
    bos_prefix,
    calibration_windows,
    fingerprint,
    interleave_windows,
    wikipedia_split,
)
from stat_core.paths import ASSETS_DIR, cache_dir

log = logging.getLogger(__name__)

SEED_PROMPTS_FILE = ASSETS_DIR / "calibration_seed_prompts.json"
SOURCES = ("mix", "wikipedia", "self-generated", "in-context")
#: Share of the windows the ``mix`` source takes from the model's own chat transcripts.
MIX_SELF_SHARE = 0.5


def default_source(tokenizer) -> str:
    """The built-in source the CLI and the app start from: ``wikipedia`` (what measured best on the
    suite overall; see the module docstring). One rule for both shells."""
    return "wikipedia"


@dataclass(frozen=True)
class GenerationSettings:
    """How the dense model answers the seed prompts (sampling, so the text is varied)."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    samples_per_prompt: int = 1
    batch_size: int = 16
    seed: int = 0


@dataclass
class DecoderCalibration:
    windows: torch.Tensor  # (num_samples, seq_len [+1 with BOS])
    info: dict = field(default_factory=dict)


def seed_prompts(path: Path | None = None) -> list[str]:
    path = path or SEED_PROMPTS_FILE
    prompts = json.loads(Path(path).read_text(encoding="utf-8"))["prompts"]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise DataError(f"{Path(path).name} must hold a non-empty list of prompt strings under 'prompts'")
    return prompts


def model_fingerprint(model) -> str:
    """Config plus a sample of every parameter: changes when the weights do, cheap to compute."""
    parts = [json.dumps(model.config.to_dict(), sort_keys=True, default=str)]
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        parts += [name, flat[:: max(1, flat.numel() // 64)][:64].float().cpu()]
    return fingerprint(*parts)


def _cache_path(model, tokenizer, prompts: list[str], settings: GenerationSettings) -> Path:
    key = fingerprint(model_fingerprint(model), tokenizer.chat_template, prompts, repr(settings))
    return cache_dir() / "self_generated" / f"{key}.json"


def generate_transcripts(model, tokenizer, prompts: list[str] | None = None,
                         settings: GenerationSettings = GenerationSettings(),
                         progress: Callable[[str, int, int], None] | None = None) -> tuple[list[list[int]], float]:
    """Token ids of whole chat transcripts (template + prompt + the model's sampled answer) and the
    seconds spent generating them (0.0 when cached)."""
    from transformers import GenerationConfig


    if not has_chat_template(tokenizer):
        raise DataError("This tokenizer has no chat template, so the model cannot write its own chat "
                        "calibration text; use --calibration wikipedia or a text file.")
    prompts = prompts if prompts is not None else seed_prompts()
    path = _cache_path(model, tokenizer, prompts, settings)
    if path.exists():
        try:
            transcripts = json.loads(path.read_text(encoding="utf-8"))["transcripts"]
            if not (isinstance(transcripts, list) and transcripts and all(
                    isinstance(t, list) and t and all(isinstance(i, int) for i in t) for t in transcripts)):
                raise ValueError("not a list of token id lists")
            log.info("self-generated calibration text from the cache (%s)", path.name)
            return transcripts, 0.0
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:  # damaged: said, removed, generated again
            log.warning("The cached chat text %s is damaged (%s); generating it again.", path,
                        str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
            path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    ends = end_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=True, temperature=settings.temperature,
                              top_p=settings.top_p, top_k=0, eos_token_id=ends or None, pad_token_id=pad_id)
    requests = [chat_prompt_ids(tokenizer, p) for p in prompts for _ in range(settings.samples_per_prompt)]
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    transcripts: list[list[int]] = []
    ends_set = set(ends)
    n_batches = (len(requests) + settings.batch_size - 1) // settings.batch_size
    was_training = model.training
    model.eval()
    if progress is not None:  # the bar and its total from the start (a batch takes minutes on a 0.5B CPU run)
        progress("self-generated calibration text", 0, n_batches)
    with torch.no_grad():
        for b in range(n_batches):
            batch = requests[b * settings.batch_size:(b + 1) * settings.batch_size]
            ids, mask, _ = left_pad(batch, pad_id)
            mask = torch.ones_like(ids) if mask is None else mask
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for row, prompt in enumerate(batch):
                new = out[row, ids.shape[1]:].tolist()
                cut = next((j + 1 for j, t in enumerate(new) if t in ends_set), len(new))
                transcripts.append(list(prompt) + new[:cut])
            if progress is not None:
                progress("self-generated calibration text", b + 1, n_batches)
    model.train(was_training)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name per writer, renamed into place: never a half-written entry, and two
    # setups generating at once each publish a whole file (the last rename wins; both are valid).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"settings": repr(settings), "seconds": seconds, "transcripts": transcripts,
                            "texts": [tokenizer.decode(t) for t in transcripts[:8]]}))
    os.replace(tmp_name, path)
    log.info("generated %d transcripts (%d tokens) in %.0f s", len(transcripts), sum(map(len, transcripts)), seconds)
    return transcripts, seconds


def transcript_windows(tokenizer, transcripts: list[list[int]], num_samples: int, seq_len: int,
                       seed: int = 0) -> torch.Tensor:
    """``(num_samples, seq_len [+1 BOS])`` windows cut from the transcripts laid end to end in a
    seeded shuffled order (each window starts on a transcript boundary where it can)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(transcripts), generator=gen).tolist()
    stream = torch.tensor([t for i in order for t in transcripts[i]], dtype=torch.long)
    if len(stream) < seq_len:
        raise DataError(f"the self-generated text has {len(stream)} tokens, fewer than one window of {seq_len}")
    n_fit = len(stream) // seq_len
    if n_fit < num_samples:
        log.warning("self-generated text fills %d windows of %d, %d requested; windows will repeat",
                    n_fit, seq_len, num_samples)
    idx = torch.arange(num_samples) % n_fit
    windows = torch.stack([stream[i * seq_len:(i + 1) * seq_len] for i in idx.tolist()])
    prefix = bos_prefix(tokenizer)
    if prefix:
        windows = torch.cat([torch.full((len(windows), 1), prefix[0]), windows], dim=1)
    return windows


def decoder_calibration(model, tokenizer, source: str, config: CalibrationConfig = CalibrationConfig(),
                        settings: GenerationSettings = GenerationSettings(),
                        progress: Callable[[str, int, int], None] | None = None,
                        prompts: list[str] | None = None, self_share: float = MIX_SELF_SHARE) -> DecoderCalibration:
    """Calibration windows from one of :data:`SOURCES` (a text file is read by the caller);
    ``prompts``: seed prompts (default: the project's asset file); ``self_share``: the ``mix`` source's
    share of self-generated windows."""
    if source not in SOURCES:
        raise DataError(f"Unknown calibration source '{source}'; choose one of {', '.join(SOURCES)} or give a text file.")
    info: dict = {"source": source, "num_samples": config.num_samples, "seq_len": config.seq_len, "seed": config.seed}
    if source == "wikipedia":
        return DecoderCalibration(calibration_windows(tokenizer, wikipedia_split("calibration"), config), info)
    if source == "in-context":  # few-shot demonstrations written from the same articles (no generation)
        windows, extra = in_context_calibration(tokenizer, config)
        return DecoderCalibration(windows, {**info, **extra})
    prompts = prompts if prompts is not None else seed_prompts()
    transcripts, seconds = generate_transcripts(model, tokenizer, prompts, settings, progress)
    n_self = config.num_samples if source == "self-generated" else max(1, round(config.num_samples * self_share))
    windows = transcript_windows(tokenizer, transcripts, n_self, config.seq_len, config.seed)
    if n_self < config.num_samples:
        wiki = CalibrationConfig(num_samples=config.num_samples - n_self, seq_len=config.seq_len, seed=config.seed)
        windows = interleave_windows(calibration_windows(tokenizer, wikipedia_split("calibration"), wiki), windows)
    info.update({"self_generated_windows": n_self, "wikipedia_windows": config.num_samples - n_self,
                 "generation_seconds": seconds, "seed_prompts": len(prompts),
                 "transcripts": len(transcripts), "generation": repr(settings)})
    return DecoderCalibration(windows, info)
