"""A code measure for code models: greedy pass@1 on small Python function-completion problems.

The problems (``assets/code_problems.json``, written for this project) are a signature and a
docstring each; the model continues the prompt greedily (plain completion, no chat template, as
code models are scored on HumanEval-style prompts), the completion is cut at the function's end,
and the function plus the problem's asserts run in a subprocess:

- a fresh interpreter (``-I``: no user site, no environment variables read) in its own scratch
  folder, with a minimal environment, under a wall-clock limit (killed past it) and resource limits
  (CPU seconds, 1 GiB of address space, 1 MiB per written file, no core dumps);
- an audit hook installed before the candidate runs refuses sockets, subprocesses, ``exec``,
  ``fork``, ``ctypes`` and any write, rename or delete outside the scratch folder.

This is a guard against a model's mistakes (an endless loop, a stray ``os.remove``), not a security
boundary against a program written to escape: run untrusted code in a container as well.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stat_core.paths import ASSETS_DIR
from stat_core.progress import ProgressFn, notify

log = logging.getLogger(__name__)

PROBLEMS_FILE = ASSETS_DIR / "code_problems.json"
TIME_LIMIT_S = 5.0

# Runs before the candidate, inside the child. Audit hooks cannot be removed once added.
_GUARD = r'''
import os as _os, sys as _sys
_ROOT = _os.path.realpath(_os.getcwd())
_WRITE_FLAGS = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND

def _inside(path):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    full = _os.path.realpath(_os.path.join(_ROOT, _os.fspath(path)))
    return full == _ROOT or full.startswith(_ROOT + _os.sep)

def _guard(event, args):
    if event.startswith(("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.fork", "os.system",
                         "os.spawn", "pty.", "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill",
                         "os.startfile", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.", "telnetlib.")):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args and str(args[0]).split(".")[0] in ("ctypes", "_ctypes", "socket", "_socket",
                                                                      "subprocess", "multiprocessing"):
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, 0])[:3]
        writing = (isinstance(mode, str) and any(m in mode for m in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the scratch folder is not allowed")
    if event in ("os.remove", "os.unlink", "os.rmdir", "os.mkdir", "os.rename", "os.replace", "os.chmod",
                 "os.chown", "os.truncate", "os.symlink", "os.link", "os.utime", "shutil.rmtree",
                 "shutil.move", "shutil.copyfile", "os.chdir", "os.chroot"):
        paths = [a for a in args if isinstance(a, (str, bytes)) or hasattr(a, "__fspath__")]
        if event in ("os.chdir", "os.chroot") or not all(_inside(p) for p in paths):
            raise PermissionError(f"sandbox: {event} outside the scratch folder is not allowed")

_sys.addaudithook(_guard)
del _guard
'''


def _limits(cpu_seconds: int, memory_bytes: int, file_bytes: int):
    def apply():  # runs in the child between fork and exec
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setsid()  # its own process group, so a timeout kills everything it started
    return apply


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str        # "passed", "failed", "timeout"
    detail: str        # the last line of stderr (why it failed), or ""
    seconds: float


def run_candidate(program: str, time_limit: float = TIME_LIMIT_S, memory_mb: int = 1024) -> RunResult:
    """Run ``program`` (a candidate function and its asserts) in the sandbox described in the module
    docstring; passed when it exits 0 within ``time_limit`` seconds."""
    with tempfile.TemporaryDirectory(prefix="stat-code-") as scratch:
        path = Path(scratch) / "candidate.py"
        path.write_text(_GUARD + "\n" + program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "no_proxy": "*", "http_proxy": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9"}
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-B", str(path)], cwd=scratch, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=_limits(int(time_limit) + 1, memory_mb * 2**20, 2**20))
        try:
            _, err = proc.communicate(timeout=time_limit)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.communicate()
            return RunResult(False, "timeout", f"no result within {time_limit:g} s", time.perf_counter() - t)
        seconds = time.perf_counter() - t
    lines = [x for x in err.decode("utf-8", "replace").splitlines() if x.strip()]
    if proc.returncode == 0:
        return RunResult(True, "passed", "", seconds)
    return RunResult(False, "failed", lines[-1][:300] if lines else f"exit code {proc.returncode}", seconds)


@dataclass(frozen=True)
class CodeProblem:
    name: str
    prompt: str        # signature + docstring, ending in a newline
    tests: str         # asserts run after the function
    solution: str = ""  # a reference body that passes (checked by the tests)


def code_problems(path: Path = PROBLEMS_FILE) -> list[CodeProblem]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [CodeProblem(p["name"], p["prompt"], p["tests"], p.get("solution", "")) for p in data["problems"]]


def function_body(completion: str) -> str:
    """The completion up to the function's end: the first non-blank line that is not indented (a new
    top-level statement, a markdown fence, the next ``def``) ends it."""
    lines = []
    for line in completion.splitlines():
        if line.strip() and not line[:1].isspace():
            break
        lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


def generate_completions(model, tokenizer, problems: Sequence[CodeProblem], max_new_tokens: int = 160,
                         batch_size: int = 8, progress: ProgressFn | None = None) -> list[str]:
    """Greedy completions of each problem's prompt (left-padded batches, the model's own BOS when its
    tokenizer adds one), cut at the function's end."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        encoded = [tokenizer(p.prompt, add_special_tokens=True)["input_ids"] for p in batch]
        width = max(map(len, encoded))
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(encoded):
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 stop_strings=["\ndef ", "\nclass ", "\nif __name__", "\n```", "\nprint(",
                                               "\nassert "], tokenizer=tokenizer)
        for row in gen[:, width:]:
            out.append(function_body(tokenizer.decode(row, skip_special_tokens=True)))
        notify(progress, "code problems", min(start + batch_size, len(problems)), len(problems))
    return out


def code_pass_at_1(model, tokenizer, problems: Sequence[CodeProblem] | None = None,
                   progress: ProgressFn | None = None, time_limit: float = TIME_LIMIT_S) -> dict:
    """Greedy pass@1: ``{"code_pass_at_1", "code_passed", "code_problems", "code_results"}``
    (``code_results``: per problem, its status, why it failed and the first 400 characters of the
    completion)."""
    problems = list(problems if problems is not None else code_problems())
    completions = generate_completions(model, tokenizer, problems, progress=progress)
    results = {}
    for problem, body in zip(problems, completions):
        result = run_candidate(problem.prompt + body + "\n\n" + problem.tests, time_limit=time_limit)
        results[problem.name] = {"status": result.status, "detail": result.detail, "completion": body[:400]}
    passed = sum(r["status"] == "passed" for r in results.values())
    return {"code_pass_at_1": passed / len(problems), "code_passed": passed, "code_problems": len(problems),
            "code_results": results}
