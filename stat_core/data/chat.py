"""Chat-template helpers: prompt ids, end tokens, left padding."""

from __future__ import annotations

import json
import subprocess
import sys
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


#: A chat template is rendered first in a child process with these limits: a template is code from the
#: model folder, and Jinja's sandbox bounds neither memory (``'a' * 4000000000``) nor time (nested loops).
RENDER_SECONDS = 10
RENDER_MEMORY_BYTES = 1 << 30
_CHECK_SCRIPT = r"""
import json, resource, sys
limit, seconds = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
sys.setrecursionlimit(500)
data = json.loads(sys.stdin.read())
from transformers.utils.chat_template_utils import render_jinja_template
try:
    out = render_jinja_template(conversations=[data["conversation"]], chat_template=data["template"],
                                add_generation_prompt=True, **data["tokens"])
except MemoryError:
    print(json.dumps("it needs more than a gigabyte of memory")); sys.exit(0)
except RecursionError:
    print(json.dumps("it recurses without end")); sys.exit(0)
except Exception as exc:
    print(json.dumps(f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}")); sys.exit(0)
print(json.dumps(None))
"""
_CHECKED: dict[str, str | None] = {}


def _template_text(tokenizer) -> str | None:
    try:
        return tokenizer.get_chat_template()
    except Exception:  # none, or several named ones without a default
        template = getattr(tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None


def chat_template_problem(tokenizer, prompt: str = "Hello.") -> str | None:
    """Why the tokenizer's chat template cannot render a user turn, as a short phrase, or None. The
    template is run first in a child process limited to :data:`RENDER_SECONDS` of CPU and
    :data:`RENDER_MEMORY_BYTES` (once per template; refused by Jinja's sandbox, a syntax error, an
    error it raises, endless recursion, too much memory or time are all problems), so a hostile template
    from a model folder can neither exhaust this process nor end it with a traceback."""
    template = _template_text(tokenizer)
    if not template:
        return None
    key = json.dumps([template, prompt])
    if key not in _CHECKED:
        tokens = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        payload = json.dumps({"template": template, "tokens": tokens,
                              "conversation": [{"role": "user", "content": prompt}]})
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _CHECK_SCRIPT, str(RENDER_MEMORY_BYTES),
                                   str(RENDER_SECONDS)], input=payload, capture_output=True, text=True,
                                  timeout=RENDER_SECONDS * 3)
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                problem = json.loads(lines[-1])
            elif done.returncode < 0:  # killed by its limits (SIGXCPU / SIGKILL)
                problem = f"it ran past its {RENDER_SECONDS} s limit"
            else:
                problem = "it stopped its renderer" + (f" ({done.stderr.strip().splitlines()[-1]})"
                                                       if done.stderr.strip() else "")
        except subprocess.TimeoutExpired:
            problem = f"it ran past its {RENDER_SECONDS} s limit"
        _CHECKED[key] = problem
    return _CHECKED[key]


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """One user turn through the chat template, with the assistant's turn opened; a template that
    cannot render (refused by Jinja's sandbox, raising, too slow or too large: :func:`chat_template_problem`)
    is a DataError with one sentence."""
    problem = chat_template_problem(tokenizer)
    try:
        if problem is None:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
    except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as exc:
        problem = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
    if problem is not None:
        raise DataError(f"The model's chat template cannot be used ({problem}); fix or remove the chat template "
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
