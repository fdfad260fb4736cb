"""The on-disk calibration cache (stat_core.calibration.cache, prune.cached_calibration): a hit gives
bit-identical plans; any change of the settings, a weight or the windows misses; a damaged or stale
entry is rebuilt with a warning, never used. Tiny random models, a cache folder per test."""

import copy
import json
import logging

import pytest
import torch
from conftest import tiny_model

from stat_core import pipeline
from stat_core.calibration import cache as C
from stat_core.calibration.statistics import CalibrationSet
from stat_core.config import PruneConfig
from stat_core.methods.stat import explain


@pytest.fixture
def cache_on(monkeypatch, tmp_path):
    monkeypatch.setenv("STAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("STAT_CALIBRATION_CACHE", "on")
    return tmp_path / "cache" / "calibration"


@pytest.fixture
def calls(monkeypatch):
    """How many times the real calibration ran."""
    seen = []
    real = pipeline.calibrate
    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: seen.append(1) or real(*a, **k))
    return seen


def hit(calibration) -> bool:
    return calibration.extras["disk_cache"]["hit"]


def plans(model, calibration, data):
    out = []
    for sparsity in (0.2, 0.5):
        for method in ("stat", "wanda-sp"):
            config = PruneConfig(sparsity=sparsity, method=method)
            out.append(pipeline.plan_pruning(model, calibration, config, "tiny", {}, data=data).to_dict())
    return out


def same_numbers(a, b):
    for x, y in zip(a.dense_stats, b.dense_stats, strict=True):
        assert torch.equal(x.attn_gram, y.attn_gram) and torch.equal(x.mlp_gram, y.mlp_gram)
        assert torch.equal(x.attn_sum, y.attn_sum) and torch.equal(x.mlp_sum, y.mlp_sum)
        assert (x.n_tokens, x.resid_energy) == (y.n_tokens, y.resid_energy)
    for x, y in zip(a.sensitivity, b.sensitivity, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in ("attn", "mlp"))
    for x, y in zip(a.analyses, b.analyses, strict=True):
        assert x.head_configs == y.head_configs and list(x.head_order) == list(y.head_order)
        assert torch.equal(x.neuron_order, y.neuron_order) and torch.equal(x.mlp_damage, y.mlp_damage)


def test_a_cache_round_trip_gives_bit_identical_plans(cache_on, calls, windows):
    model, config = tiny_model(), PruneConfig(sparsity=0.0)
    uncached = pipeline.calibrate(model, windows, config)
    first = pipeline.cached_calibration(model, windows, config)
    assert not hit(first) and len(calls) == 2 and len(list(cache_on.glob("*.safetensors"))) == 1
    stages = []
    second = pipeline.cached_calibration(model, windows, config, lambda s, d, t: stages.append(s))
    assert hit(second) and len(calls) == 2 and stages == ["calibration cache", "calibration cache"]
    assert "cache_read" in second.timings and "calibrate" in second.extras["disk_cache"]["computed_timings"]
    same_numbers(uncached, second)
    assert plans(model, second, windows) == plans(model, uncached, windows)
    # the app's path keeps the inspect views' spectra in the entry too: once rebuilt with them, read back
    spectra = explain.calibration_spectra(model, uncached)
    app = pipeline.calibrate_statistics(model, windows)
    assert not hit(app) and len(calls) == 3 and app.timings["spectra"] > 0
    app = pipeline.calibrate_statistics(model, windows)
    assert hit(app) and len(calls) == 3 and explain.calibration_spectra(model, app) == spectra
    assert plans(model, app, windows) == plans(model, uncached, windows)
    assert pipeline.calibrate_statistics(model, windows, cache=False).timings["spectra"] > 0 and len(calls) == 4
    # the prune verb with cache=True cuts the same model as without
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = pipeline.stat_prune_(a, windows, PruneConfig(sparsity=0.3), cache=True)
    rb = pipeline.stat_prune_(b, windows, PruneConfig(sparsity=0.3))
    assert ra.plan.to_dict() == rb.plan.to_dict()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_centred_statistics_and_classifier_windows_round_trip(cache_on, calls):
    from test_measure import tiny_classifier

    model = tiny_classifier()
    gen = torch.Generator().manual_seed(0)
    data = CalibrationSet(torch.randint(0, 100, (6, 12), generator=gen), torch.ones(6, 12, dtype=torch.long),
                          torch.tensor([0, 1, 0, 1, 0, 1]))
    data.attention_mask[0, 8:] = 0
    config = PruneConfig(sparsity=0.0, intercept=True)
    uncached = pipeline.calibrate(model, data, config)
    pipeline.cached_calibration(model, data, config)
    again = pipeline.cached_calibration(model, data, config)
    assert hit(again) and again.centered
    same_numbers(uncached, again)


@pytest.mark.parametrize("change", ["batch_size", "sensitivity_samples", "sensitivity_labels", "intercept",
                                    "weight", "windows", "mask"])
def test_any_change_misses_the_cache(cache_on, calls, windows, change):
    model, config, data = tiny_model(), PruneConfig(sparsity=0.0), CalibrationSet(windows)
    assert not hit(pipeline.cached_calibration(model, data, config))
    assert hit(pipeline.cached_calibration(model, data, config))
    if change == "batch_size":
        config = PruneConfig(sparsity=0.0, batch_size=3)
    elif change == "sensitivity_samples":
        config = PruneConfig(sparsity=0.0, sensitivity_samples=2)
    elif change == "sensitivity_labels":
        config = PruneConfig(sparsity=0.0, sensitivity_labels="model")
    elif change == "intercept":
        config = PruneConfig(sparsity=0.0, intercept=True)
    elif change == "weight":
        model = copy.deepcopy(model)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6
    elif change == "windows":
        ids = windows.clone()
        ids[7, 23] = (ids[7, 23] + 1) % 128
        data = CalibrationSet(ids)
    else:
        mask = torch.ones_like(windows)
        mask[0, -1] = 0
        data = CalibrationSet(windows, mask)
    n = len(calls)
    assert not hit(pipeline.cached_calibration(model, data, config)) and len(calls) == n + 1
    assert len(list(cache_on.glob("*.safetensors"))) == 2


def test_the_key_covers_what_the_numbers_depend_on(windows):
    model = tiny_model()
    key = C.key_for(model, windows, PruneConfig(sparsity=0.5, method="wanda-sp", uniform=True))
    assert key == C.key_for(copy.deepcopy(model), windows.clone(), PruneConfig(sparsity=0.1))  # budget: not in it
    assert dict(key.settings) == {"sensitivity_samples": None, "batch_size": 8, "intercept": False,
                                  "sensitivity_labels": "data", "sensitivity_batch": 1, "memory_savers": True}
    assert key != C.key_for(model, windows, PruneConfig(sparsity=0.1, memory_savers=False))  # sums agree to rounding only
    assert key != C.key_for(model.to(torch.float64), windows, PruneConfig(sparsity=0.1))  # dtype is in the bytes
    assert key.format == C.FORMAT_VERSION and len(key.code) == 64
    model.register_buffer("scale", torch.tensor(2.0, dtype=torch.bfloat16))  # 0-dim, 2-byte: hashed too
    scaled = C.key_for(model, windows, PruneConfig(sparsity=0.1))
    model.scale.fill_(3.0)
    assert key != scaled != C.key_for(model, windows, PruneConfig(sparsity=0.1))


def _warm(cache_on, windows):
    model, config = tiny_model(), PruneConfig(sparsity=0.0)
    pipeline.cached_calibration(model, windows, config)
    (path,) = cache_on.glob("*.safetensors")
    return model, config, path


def _rewrite_metadata(path, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "old format", "other key", "nan", "no analyses"])
def test_a_damaged_or_stale_entry_is_rebuilt_with_a_warning(cache_on, calls, windows, damage, caplog):
    model, config, path = _warm(cache_on, windows)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64 + good[64:])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "old format":
        _rewrite_metadata(path, **{"extra.format": "0"})
    elif damage == "other key":
        _rewrite_metadata(path, **{"extra.key": json.dumps({"model": "someone else's"})})
    elif damage == "nan":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors["1.mlp_gram"][0, 0] = float("nan")
        save_file(tensors, str(path), metadata=meta)
    else:
        _rewrite_metadata(path, **{"extra.info": "{}"})
    n = len(calls)
    with caplog.at_level(logging.WARNING):
        rebuilt = pipeline.cached_calibration(model, windows, config)
    assert not hit(rebuilt) and len(calls) == n + 1
    assert any("Ignoring the cached calibration" in r.getMessage() for r in caplog.records), caplog.text
    same_numbers(pipeline.calibrate(model, windows, config), rebuilt)
    # rebuilt in place: the next call reads it
    assert path.is_file() and hit(pipeline.cached_calibration(model, windows, config))


def test_writes_are_atomic_and_failures_only_logged(cache_on, windows, monkeypatch, caplog):
    model, config = tiny_model(), PruneConfig(sparsity=0.0)

    def half_written(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(C, "save_stats", half_written)
    with caplog.at_level(logging.WARNING):
        calibration = pipeline.cached_calibration(model, windows, config)
    assert calibration.extras["disk_cache"] == {"hit": False, "file": None}
    assert "Could not store the calibration" in caplog.text
    assert list(cache_on.iterdir()) == []  # neither the entry nor its temporary file


def test_the_cache_is_bounded_and_can_be_turned_off(cache_on, windows, monkeypatch):
    model, config = tiny_model(), PruneConfig(sparsity=0.0)
    pipeline.cached_calibration(model, windows, config)
    (first,) = cache_on.glob("*.safetensors")
    monkeypatch.setenv("STAT_CALIBRATION_CACHE_GB", str(1.5 * first.stat().st_size / 2 ** 30))
    pipeline.cached_calibration(model, windows[:4], config)
    assert len(list(cache_on.glob("*.safetensors"))) == 1 and not first.exists()  # the older one went
    monkeypatch.setenv("STAT_CALIBRATION_CACHE_GB", "0")
    assert pipeline.cached_calibration(model, windows[:2], config).extras["disk_cache"]["file"] is None
    monkeypatch.setenv("STAT_CALIBRATION_CACHE", "off")
    assert "disk_cache" not in pipeline.cached_calibration(model, windows[:3], config).extras


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "minilm-classifier"])
def test_setup_calibrated_the_demo_models_at_the_app_defaults(monkeypatch, name):
    """scripts/setup.sh's entries are the ones the app's first Calibrate & prune reads on each demo
    model (seconds, not minutes)."""
    from stat_core.models import demo_model_dir, load_model
    from stat_core.setup_assets import WARM_MODELS, warm_calibration_cache

    assert name in WARM_MODELS
    monkeypatch.setenv("STAT_CALIBRATION_CACHE", "on")
    if not (demo_model_dir(name) / "config.json").exists():
        pytest.fail(f"the demo model {name} is not in the cache; run scripts/setup.sh")
    model, tokenizer = load_model(name, device="auto")
    data = pipeline.calibration_data(model, tokenizer, name).data
    if not C.key_for(model, data, pipeline.CALIBRATION_SETTINGS).path.is_file():
        pytest.fail(f"no calibration of {name} in the cache; run scripts/setup.sh")
    del model
    warm = warm_calibration_cache(name)
    assert warm["hit"] and warm["seconds"] < 30, warm


def test_the_size_bound_touches_only_its_own_entries(cache_on, windows, monkeypatch):
    """The cache folder pointed at a models folder: its size bound removes only entries it wrote (their
    names and their header), never a user's ``*.safetensors`` or ``*.tmp`` however old."""
    import hashlib
    import os

    users = tmp = cache_on.parent / "models"
    monkeypatch.setenv("STAT_CALIBRATION_CACHE_DIR", str(users))
    users.mkdir(parents=True)
    theirs = {"model.safetensors": os.urandom(4096), "a" * 40 + ".safetensors": os.urandom(4096),
              "notes.tmp": b"draft", ".backup.tmp": b"x" * 100}
    for name, data in theirs.items():
        (users / name).write_bytes(data)
        os.utime(users / name, (0, 0))  # older than anything, and than the temporary-file hour
    model, config = tiny_model(), PruneConfig(sparsity=0.0)
    pipeline.cached_calibration(model, windows, config)
    ours = [p for p in users.iterdir() if p.name not in theirs]
    assert len(ours) == 1 and ours[0].suffix == ".safetensors"
    monkeypatch.setenv("STAT_CALIBRATION_CACHE_GB", str(1.5 * ours[0].stat().st_size / 2 ** 30))
    pipeline.cached_calibration(model, windows[:4], config)  # over the bound: our older entry goes
    assert not ours[0].exists()
    for name, data in theirs.items():
        assert hashlib.sha256((tmp / name).read_bytes()).digest() == hashlib.sha256(data).digest(), name


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "four"])
def test_a_bad_size_bound_is_refused_before_any_work(cache_on, calls, windows, monkeypatch, value):
    monkeypatch.setenv("STAT_CALIBRATION_CACHE_GB", value)
    with pytest.raises(ValueError, match="STAT_CALIBRATION_CACHE_GB must be a number of gigabytes"):
        pipeline.cached_calibration(tiny_model(), windows, PruneConfig(sparsity=0.0))
    assert calls == []
