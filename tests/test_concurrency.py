"""Two setups sharing one user cache (two clones, two CI jobs on one account) write the same entries
at once: both succeed and one whole entry is left."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run_together(script: str, env_extra: dict, n: int = 2) -> list[subprocess.CompletedProcess]:
    start = time.time() + 4  # both wait for the same moment, after their imports
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(start), str(i)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, **env_extra})
             for i in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def test_two_processes_publish_the_same_model_folder(tmp_path):
    target = tmp_path / "models" / "demo"
    script = f"""
        import sys, time, tempfile
        from pathlib import Path
        from stat_core.paths import publish_dir
        start, me = float(sys.argv[1]), sys.argv[2]
        target = Path({str(target)!r})
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
        for i in range(20):
            (tmp / f"part{{i}}.txt").write_text(me * 1000)
        (tmp / "config.json").write_text(me)
        time.sleep(max(0.0, start - time.time()))
        publish_dir(tmp, target)
        print(target.joinpath("config.json").read_text())
    """
    results = _run_together(script, {})
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    winner = (target / "config.json").read_text()
    assert {(target / f"part{i}.txt").read_text() for i in range(20)} == {winner * 1000}  # one writer's, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo"]  # no temporary folder left


def test_two_processes_write_the_same_calibration_entry(tmp_path):
    script = """
        import sys, time, torch
        sys.path.insert(0, "tests")
        from conftest import tiny_model
        from stat_core.config import PruneConfig
        from stat_core.pipeline import cached_calibration
        start, me = float(sys.argv[1]), sys.argv[2]
        model = tiny_model(num_hidden_layers=2)
        windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
        time.sleep(max(0.0, start - time.time()))
        calib = cached_calibration(model, windows, PruneConfig(sparsity=0.2))
        print(calib.extras["disk_cache"])
    """
    cache = tmp_path / "calibration"
    results = _run_together(script, {"STAT_CALIBRATION_CACHE": "on", "STAT_CALIBRATION_CACHE_DIR": str(cache),
                                     "OMP_NUM_THREADS": "1"})
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    entries = list(cache.glob("*.safetensors"))
    assert len(entries) == 1 and not list(cache.glob("*.tmp")) and not list(cache.glob(".*.tmp"))
    # the entry left is whole: a third process reads it as a hit
    again = _run_together(script, {"STAT_CALIBRATION_CACHE": "on", "STAT_CALIBRATION_CACHE_DIR": str(cache)}, n=1)
    assert again[0].returncode == 0 and "'hit': True" in again[0].stdout, again[0].stderr[-2000:]
