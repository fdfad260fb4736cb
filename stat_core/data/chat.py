"""Chat-template helpers: prompt ids, end tokens, left padding."""

from __future__ import annotations

from collections.abc import Sequence

import jinja2
import torch

from stat_core.data.sources import DataError


def left_pad(sequences: Sequence[torch.Tensor | list[int]], pad_id: int
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Left-pad token sequences into ``ids (B, W)``; with unequal lengths also ``attention_mask (B, W)``
    and ``position_ids (B, W)`` counting from 0 at each sequence's first real token (HF Llama in
    transformers 5 does not derive positions from the mask). Equal lengths return ``(ids, None, None)``
    so the forward is the plain unpadded one."""
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    width = max(len(s) for s in seqs)
    if all(len(s) == width for s in seqs):
        return torch.stack(seqs), None, None
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = s
        mask[row, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_template_problem(tokenizer) -> str | None:
    """Why the tokenizer's chat template cannot render a user turn (refused by Jinja's sandbox, a
    syntax error, ...), as a short phrase, or None."""
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hello."}], tokenize=False,
                                      add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
    return None


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """One user turn through the chat template, with the assistant's turn opened; a template that
    cannot render (e.g. refused by Jinja's sandbox) is a DataError with one sentence."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        raise DataError(f"The model's chat template cannot be used ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); fix or remove the chat template "
                        "in the model folder, or calibrate on wikipedia or a text file.") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def end_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS and the generation config's EOS token(s)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return sorted(ids)
