"""Labelled text for classifiers: the two small sets in the ``gensim`` wheel, and user files.

A labelled set is split once into a training side (calibration, fine-tuning the demo classifier)
and a held-out side (accuracy); the two are never mixed.
"""

from __future__ import annotations

import io
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stat_core.data.sources import DataError, _gensim_dir, check_input_file, text_cell


@dataclass(frozen=True)
class LabelledSet:
    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise DataError("texts and labels differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index) -> "LabelledSet":
        return LabelledSet([self.texts[i] for i in index], [self.labels[i] for i in index], self.label_names)

    def split(self, seed: int = 0, train_fraction: float = 0.5) -> tuple["LabelledSet", "LabelledSet"]:
        """Stratified, seeded split into (train, held-out)."""
        rng = np.random.default_rng(seed)
        labels = np.asarray(self.labels)
        train, held = [], []
        for c in np.unique(labels):
            idx = rng.permutation(np.where(labels == c)[0])
            cut = int(round(len(idx) * train_fraction))
            train.extend(idx[:cut].tolist())
            held.extend(idx[cut:].tolist())
        return self.take(sorted(train)), self.take(sorted(held))


# --- the newsgroup sample: a Python 2 pickle of an sklearn Bunch -----------------------------------

class _Bunch(dict):
    """Stands in for sklearn's Bunch; nothing of sklearn is imported or executed."""


def _reconstructor(cls, base, state):
    return cls(state) if state is not None else cls()


def _allowed_globals() -> dict:
    from numpy._core import multiarray

    return {("copy_reg", "_reconstructor"): _reconstructor, ("sklearn.datasets.base", "Bunch"): _Bunch,
            ("__builtin__", "dict"): dict, ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the handful of globals this one file needs; anything else is refused."""

    def find_class(self, module, name):
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return allowed[(module, name)]


def _strip_news_headers(post: str) -> str:
    """Drop the header block (it names the newsgroup, i.e. the label) but keep the subject."""
    head, _, body = post.partition("\n\n")
    subject = next((line[len("Subject:"):].strip() for line in head.splitlines() if line.startswith("Subject:")), "")
    return (subject + "\n\n" + body).strip()


def newsgroups() -> LabelledSet:
    """200 posts from alt.atheism / sci.space (100 each), headers removed."""
    raw = zlib.decompress((_gensim_dir() / "test/test_data/mini_newsgroup").read_bytes())
    bunch = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    texts = [_strip_news_headers(str(t)) for t in bunch["data"]]
    return LabelledSet(texts, [int(x) for x in bunch["target"]], [str(n) for n in bunch["target_names"]])


def movie_reviews() -> LabelledSet:
    """200 movie-review sentences (Pang & Lee polarity), labels 0 = negative, 1 = positive."""
    lines = (_gensim_dir() / "test/test_data/pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines()
    texts, labels = [], []
    for line in lines:
        tag, _, text = line.partition(" ")
        if tag in ("__label__neg", "__label__pos") and text.strip():
            texts.append(text.strip())
            labels.append(1 if tag == "__label__pos" else 0)
    return LabelledSet(texts, labels, ["negative", "positive"])


BUILTIN_SETS = {"newsgroups": newsgroups, "movie-reviews": movie_reviews}


def load_labelled(source: str, text_columns: tuple[str, ...] = ("text",), label_column: str = "label") -> LabelledSet:
    """A built-in set name, or a CSV/JSON/JSONL/parquet file with text column(s) and a label column."""
    if source in BUILTIN_SETS:
        return BUILTIN_SETS[source]()
    path = Path(source)
    if not path.exists():
        raise DataError(f"Labelled data '{source}' is neither a built-in set ({', '.join(BUILTIN_SETS)}) "
                        "nor an existing file.")
    check_input_file(path, "Labelled file")
    suffix = path.suffix.lower()
    kinds = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if suffix not in kinds:
        raise DataError(f"Unsupported labelled file type '{suffix}'; use .csv, .json, .jsonl or .parquet.")
    import datasets

    try:
        ds = datasets.load_dataset(kinds[suffix], data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(f"Could not read '{path.name}' as {kinds[suffix]}: {exc.__class__.__name__}.") from exc
    missing = [c for c in (*text_columns, label_column) if c not in ds.column_names]
    if missing:
        raise DataError(f"'{path.name}' lacks column(s) {', '.join(missing)} (has: {', '.join(ds.column_names)}).")
    texts, raw = [], []
    for i, row in enumerate(ds, start=1):  # an empty cell or a nested value: refused with its row
        texts.append(" \n".join(text_cell(row[c], path.name, i, c) for c in text_columns))
        label = row[label_column]
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"'{path.name}' has an empty '{label_column}' cell in row {i:,}; give every example a "
                            "label or remove the row.")
        raw.append(text_cell(label, path.name, i, label_column))
    names = sorted({str(x) for x in raw})
    if len(names) < 2:
        raise DataError(f"'{path.name}' has fewer than two distinct labels.")
    index = {n: i for i, n in enumerate(names)}
    return LabelledSet(texts, [index[str(x)] for x in raw], names)
