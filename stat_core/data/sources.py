"""Calibration and evaluation text, and how it becomes token windows (docs/evaluation.md).

The built-in corpus is the Wikipedia sample shipped inside the ``gensim`` wheel (106 articles,
CC BY-SA). It is split by article in file order: the first 60% is the calibration pool, the last
40% the evaluation split, so calibration never sees evaluation text.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from stat_core.paths import cache_dir

log = logging.getLogger(__name__)

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CALIBRATION_FRACTION = 0.6


class DataError(ValueError):
    """Text that cannot serve the request (missing, empty, too short)."""


MAX_INPUT_BYTES = 200 * 1024 * 1024   # calibration uses at most a few hundred thousand tokens
ARCHIVE_SUFFIXES = (".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".tar", ".rar")
TEXT_SUFFIXES = ("", ".txt", ".md", ".csv", ".json", ".jsonl")
#: The tokenizer never sees more characters than this at once (the longest built-in Wikipedia
#: article has 102,504, so the built-in sample is tokenized exactly as before); longer documents
#: are cut at a line break, else a space.
MAX_PIECE_CHARS = 1 << 17
#: Calibration windows are drawn from at most the first max(POOL_TOKENS, num_samples × seq_len + 1)
#: tokens of the text: reading stops there, so memory follows the request, not the file's size.
POOL_TOKENS = 1 << 20
READ_CHUNK_CHARS = 1 << 20


class TextPiece(str):
    """A piece of a document cut for the tokenizer: it continues the previous piece directly
    (``joiner`` "", where whole documents are joined by a blank line)."""

    joiner = ""


def check_input_file(path: str | Path, what: str = "Text file") -> Path:
    """One clear sentence for a file that cannot be calibration text, before anything reads it:
    missing, a folder, over :data:`MAX_INPUT_BYTES`, a compressed archive, binary, or not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} '{path}' does not exist; give the path of a .txt, .json, .jsonl, .csv or "
                        ".parquet file.")
    if path.is_dir():
        raise DataError(f"'{path}' is a folder; give a .txt, .json, .jsonl, .csv or .parquet file.")
    if not path.is_file():  # a FIFO or a device would block the read (or never end)
        raise DataError(f"'{path}' is not a regular file (a pipe, device or socket); save the text to a file "
                        "and give its path.")
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise DataError(f"'{path.name}' is {size / 2**20:,.0f} MB; files over {MAX_INPUT_BYTES // 2**20} MB are not "
                        "read (calibration uses a few hundred thousand tokens at most): give a sample of it.")
    name = path.name.lower()
    if name.endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"'{path.name}' is a compressed archive; unpack it and give the text file inside.")
    if path.suffix.lower() in TEXT_SUFFIXES:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        if b"\x00" in head:
            raise DataError(f"'{path.name}' looks binary (it contains NUL bytes), not text; give a UTF-8 text file.")
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not merely a character cut at the 1 MB boundary
                raise DataError(f"'{path.name}' is not UTF-8 text (byte 0x{head[exc.start]:02x} at offset "
                                f"{exc.start:,}); re-save it as UTF-8.") from None
    return path


def _gensim_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise DataError("The built-in Wikipedia sample needs the 'gensim' package; run the setup command "
                        "from README.md (or `pip install gensim==4.4.0`).")
    return Path(spec.origin).parent


def wikipedia_articles() -> list[str]:
    """The cleaned Wikipedia sample, one string per article, in file order, redirects skipped.

    Cleaning with gensim's wiki markup filter is slow, so the result is cached as JSON.
    """
    cached = cache_dir() / "data" / "wikipedia_sample.json"
    if cached.exists():
        try:
            articles = json.loads(cached.read_text(encoding="utf-8"))
            if isinstance(articles, list) and articles and all(isinstance(a, str) for a in articles):
                return articles
            raise ValueError("not a list of article texts")
        except (ValueError, UnicodeDecodeError) as exc:  # damaged: said once, then rebuilt (a minute)
            log.warning("The cached Wikipedia sample %s is damaged (%s); rebuilding it.", cached,
                        str(exc).splitlines()[0][:120])
            cached.unlink(missing_ok=True)
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_gensim_dir() / WIKI_FILE, "rb") as fh:
        for _title, text, _pageid in extract_pages(fh):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = "\n".join(line.strip() for line in filter_wiki(text).splitlines())
            clean = "\n".join(p for p in clean.split("\n\n") if p.strip()).strip()
            if clean:
                articles.append(clean)
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".wikipedia_sample.", suffix=".tmp", dir=cached.parent)  # private: two
    try:                                                                                      # writers never mix
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(articles))
        os.chmod(tmp, 0o644)
        os.replace(tmp, cached)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return articles


def wikipedia_split(split: str) -> list[str]:
    """``"calibration"`` (first 60% of articles) or ``"evaluation"`` (last 40%)."""
    articles = wikipedia_articles()
    cut = int(round(len(articles) * CALIBRATION_FRACTION))
    if split == "calibration":
        return articles[:cut]
    if split == "evaluation":
        return articles[cut:]
    raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")


def load_text_file(path: str | Path) -> list[str]:
    """Documents from a .txt (blank-line separated), .json/.jsonl/.csv/.parquet (a ``text`` column)."""
    return list(text_documents(path))


def text_documents(path: str | Path):
    """:func:`load_text_file`'s documents, read lazily: a .txt file 1 MB at a time, a table row by row;
    a document longer than :data:`MAX_PIECE_CHARS` comes as :class:`TextPiece` continuations. The file
    is checked (:func:`check_input_file`) before this returns; a consumer that stops early (enough
    tokens) stops the reading. Raises :class:`DataError` for a file without text or a bad cell."""
    path = check_input_file(path)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ""):
        return _nonempty(path, _txt_documents(path))
    if suffix in (".json", ".jsonl", ".csv", ".parquet"):
        import datasets

        kind = {".jsonl": "json"}.get(suffix, suffix[1:])
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types for malformed files
            raise DataError(f"Could not read '{path.name}' as {kind}: {exc.__class__.__name__}. "
                            "Check that the file is valid.") from exc
        if "text" not in ds.column_names:
            raise DataError(f"'{path.name}' has no 'text' column (columns: {', '.join(ds.column_names)}).")
        return _nonempty(path, _table_documents(path, ds))
    raise DataError(f"Unsupported text file type '{suffix}'; use .txt, .json, .jsonl, .csv or .parquet.")


def text_cell(value, name: str, row: int, column: str = "text") -> str:
    """A table cell as text: a string or a plain number; an empty cell or a nested value (a JSON
    object or list) is refused with the row it is in (``row`` counts from 1)."""
    if value is None:
        raise DataError(f"'{name}' has an empty '{column}' cell in row {row:,}; fill it or remove the row.")
    if isinstance(value, (dict, list, tuple)):
        raise DataError(f"'{name}' has a {'JSON object' if isinstance(value, dict) else 'list'} instead of text in "
                        f"the '{column}' column, row {row:,}; give plain text there.")
    return value if isinstance(value, str) else str(value)


def _table_documents(path: Path, ds):
    row = 0
    for batch in ds.select_columns(["text"]).iter(batch_size=256):
        for value in batch["text"]:
            row += 1
            doc = text_cell(value, path.name, row).strip()
            if doc:
                yield doc


def _nonempty(path: Path, documents):
    any_text = False
    for doc in documents:
        any_text = True
        yield doc
    if not any_text:
        raise DataError(f"'{path.name}' contains no text.")


def _txt_documents(path: Path):
    """Blank-line separated documents of a UTF-8 file (each stripped, empty ones skipped), read in
    chunks; a document over MAX_PIECE_CHARS is yielded in pieces as it is read."""
    started = False  # the current document has yielded a piece

    def emit(piece: str, final: bool):
        nonlocal started
        if not started:
            piece = piece.lstrip()
        if final:
            piece = piece.rstrip()
        out = None
        if piece:
            out = TextPiece(piece) if started else piece
            started = True
        if final:
            started = False
        return out

    buf = ""
    try:
        with open(path, encoding="utf-8") as f:
            while True:
                chunk = f.read(READ_CHUNK_CHARS)
                buf += chunk
                parts = buf.split("\n\n")
                buf = parts.pop() if chunk else ""
                for part in parts:
                    for i, piece in enumerate(pieces := _cut(part)):
                        if (out := emit(piece, i == len(pieces) - 1)) is not None:
                            yield out
                if not chunk:
                    return
                if len(buf) > MAX_PIECE_CHARS:  # a long document: pass on all but its tail
                    pieces = _cut(buf)
                    buf = pieces.pop()
                    for piece in pieces:
                        if (out := emit(piece, False)) is not None:
                            yield out
    except UnicodeDecodeError:
        raise DataError(f"'{path.name}' is not UTF-8 text; re-save it as UTF-8.") from None


def _cut(text: str, limit: int | None = None) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters that concatenate back to it, each cut just
    before a line break (else a space, else at the limit)."""
    limit = limit or MAX_PIECE_CHARS
    pieces, start = [], 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind("\n", start + 1, end)
        if cut <= start:
            cut = text.rfind(" ", start + 1, end)
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_id]`` when the tokenizer itself prepends BOS (Gemma does, SmolLM2 does not), else []."""
    ids = tokenizer("a", add_special_tokens=True).input_ids
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and len(ids) > 0 and ids[0] == bos else []


def token_stream(tokenizer, documents: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Documents joined by blank lines and tokenized without special tokens: ``(n_tokens,)`` long.
    ``documents`` may be any iterable (read lazily: reading stops at ``max_tokens``); the tokenizer sees
    at most :data:`MAX_PIECE_CHARS` characters at a time."""
    ids: list[int] = []
    for i, doc in enumerate(documents):
        text = doc if i == 0 else getattr(doc, "joiner", "\n\n") + doc
        for piece in _cut(text):
            ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class CalibrationConfig:
    """Which windows to calibrate on (the defaults of docs/evaluation.md)."""

    num_samples: int = 64
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise DataError(f"The number of calibration samples must be at least 1, got {self.num_samples}.")
        if self.seq_len < 8:
            raise DataError(f"The sequence length must be at least 8 tokens, got {self.seq_len}.")


MAX_CALIBRATION_TOKENS = 1 << 24  # 16.8M tokens: 512x the default 64 x 512, far beyond what calibration needs


def check_calibration_sizes(model, num_samples, seq_len, tokenizer=None) -> tuple[int, int]:
    """Validated ``(num_samples, seq_len)`` for ``model`` (CLI, app and API alike): whole numbers,
    at least 1 sample and 8 tokens, at most :data:`MAX_CALIBRATION_TOKENS` in all, and windows that
    fit the model's position embeddings — with the BOS token a decoder's ``tokenizer`` adds in front
    (give the tokenizer for decoders; encoders count their special tokens inside ``seq_len``)."""
    out = []
    for what, value in (("number of calibration samples", num_samples), ("sequence length", seq_len)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataError(f"The {what} must be a whole number, got {value!r}.") from None
        if number != int(number):
            raise DataError(f"The {what} must be a whole number, got {value!r}.")
        out.append(int(number))
    num_samples, seq_len = out
    if num_samples < 1:
        raise DataError(f"The number of calibration samples must be at least 1, got {num_samples}.")
    if seq_len < 8:
        raise DataError(f"The sequence length must be at least 8 tokens, got {seq_len}.")
    if num_samples * seq_len > MAX_CALIBRATION_TOKENS:
        raise DataError(f"{num_samples:,} samples of {seq_len:,} tokens is {num_samples * seq_len:,} calibration tokens, "
                        f"more than the {MAX_CALIBRATION_TOKENS:,} calibration can use; ask for fewer samples.")
    positions = getattr(model.config, "max_position_embeddings", None)
    bos = len(bos_prefix(tokenizer)) if tokenizer is not None and positions else 0
    limit = positions - bos if positions else positions
    if limit and seq_len > limit:
        raise DataError(f"A sequence length of {seq_len:,} tokens is beyond the model's {positions:,} positions"
                        + (" once the tokenizer's BOS token is added" if bos else "") + f"; use at most {limit:,}.")
    return num_samples, seq_len


def calibration_windows(tokenizer, documents: list[str], config: CalibrationConfig) -> torch.Tensor:
    """``(num_samples, seq_len [+1 with BOS])`` windows at seeded random offsets in the token stream."""
    need = config.num_samples * config.seq_len
    stream = token_stream(tokenizer, documents, max_tokens=max(POOL_TOKENS, need + 1))
    if len(stream) < config.seq_len + 1:
        raise DataError(f"The calibration text has {len(stream)} tokens, fewer than one window of "
                        f"{config.seq_len}; give more text or a shorter sequence length.")
    if len(stream) < need:
        log.warning("calibration text has %d tokens, fewer than the %d requested; windows will overlap",
                    len(stream), need)
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, len(stream) - config.seq_len + 1, (config.num_samples,), generator=gen)
    windows = torch.stack([stream[s:s + config.seq_len] for s in starts.tolist()])
    prefix = bos_prefix(tokenizer)
    if prefix:
        windows = torch.cat([torch.full((len(windows), 1), prefix[0]), windows], dim=1)
    return windows


def interleave_windows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` and ``b`` alternating (the rest of the longer one at the end), so any prefix
    of the set (e.g. the gradient pass's first windows) sees both sources."""
    rows = []
    for i in range(max(len(a), len(b))):
        rows += ([a[i]] if i < len(a) else []) + ([b[i]] if i < len(b) else [])
    return torch.stack(rows)


def fingerprint(*parts) -> str:
    """Short stable hash of tensors / strings / numbers, for caching statistics per (model, data)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]
