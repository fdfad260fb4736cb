"""Mergeable calibration statistics and calibration spread over processes (torch.distributed, gloo)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_model
from test_encoders import padded_set, tiny_classifier
from stat_core.calibration import distributed
from stat_core.adapters import get_adapter
from stat_core.calibration.statistics import (BlockStats, LayerwiseRunner, load_stats, merge_stats, save_stats, sensitivity_sums)
from stat_core.config import PruneConfig
from stat_core.pipeline import stat_prune_

WORLD = 2


def _windows(n=8, length=24, seed=1):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _dense_stats(model, data, batch_size=2):
    runner = LayerwiseRunner(model, get_adapter(model), data, batch_size)
    hidden, stats = runner.hidden, []
    for layer in range(get_adapter(model).num_layers):
        s, hidden = runner.collect_block(layer, hidden)
        stats.append(s)
    return stats


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _assert_stats_close(got: list[BlockStats], want: list[BlockStats], tol: float):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.n_tokens == w.n_tokens
        assert abs(g.resid_energy - w.resid_energy) <= tol * w.resid_energy
        for name in ("attn_gram", "mlp_gram", "attn_sum", "mlp_sum"):
            assert _rel(getattr(g, name), getattr(w, name)) <= tol, name


# --- mergeable statistics ----------------------------------------------------------------------

def test_merged_halves_equal_the_whole_decoder():
    model = tiny_model("llama")
    data = _windows()
    whole = _dense_stats(model, data)
    merged = merge_stats(_dense_stats(model, data[:4]), _dense_stats(model, data[4:]))
    _assert_stats_close(merged, whole, 1e-10)
    assert whole[0].attn_gram.device.type == "cpu"  # statistics leave the model's device per block
    # Sensitivity sums merge too, with model-sampled labels: they are seeded per global window index.
    adapter = get_adapter(model)
    full = sensitivity_sums(model, adapter, data, 4, labels="model")
    halves = (sensitivity_sums(model, adapter, data[:3], 4, labels="model", first_index=0)
              + sensitivity_sums(model, adapter, data[3:], 4, labels="model", first_index=3))
    assert halves.n_tokens == full.n_tokens == data.numel()
    for f, h in zip(full.normalised(), halves.normalised()):
        for kind in ("attn", "mlp"):
            assert _rel(h[kind], f[kind]) < 1e-6  # float32 per-batch products, batches grouped differently
    # Without the offset the second half would re-use the first half's samples: a different matrix.
    unshifted = (sensitivity_sums(model, adapter, data[:3], 4, labels="model")
                 + sensitivity_sums(model, adapter, data[3:], 4, labels="model"))
    assert _rel(unshifted.normalised()[0]["mlp"], full.normalised()[0]["mlp"]) > 1e-4


def test_merged_halves_equal_the_whole_encoder_with_padding():
    model = tiny_classifier("bert")
    data = padded_set(n=8)
    whole = _dense_stats(model, data)
    merged = merge_stats(_dense_stats(model, data.take(slice(0, 4))), _dense_stats(model, data.take(slice(4, 8))))
    _assert_stats_close(merged, whole, 1e-10)
    assert whole[0].n_tokens == int(data.attention_mask.sum())  # padding never counted


def test_merge_refuses_different_shapes():
    a = BlockStats(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64), 1, 1.0)
    b = BlockStats(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(8, 8, dtype=torch.float64), 1, 1.0)
    with pytest.raises(ValueError, match="differently shaped"):
        a + b


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model("llama")
    data = _windows()
    stats = _dense_stats(model, data)
    sens = sensitivity_sums(model, get_adapter(model), data[:4], 4)
    path = save_stats(tmp_path / "stats.safetensors", stats, sens)
    loaded, loaded_sens = load_stats(path)
    for s, l in zip(stats, loaded):
        assert (s.n_tokens, s.resid_energy) == (l.n_tokens, l.resid_energy)
        for name in ("attn_gram", "mlp_gram", "attn_sum", "mlp_sum"):
            assert getattr(l, name).dtype == torch.float64
            assert torch.equal(getattr(s, name), getattr(l, name)), name
    assert loaded_sens.n_tokens == sens.n_tokens
    for f, g in zip(sens.fisher, loaded_sens.fisher):
        assert torch.equal(f["attn"], g["attn"]) and torch.equal(f["mlp"], g["mlp"])
    # Loaded statistics merge like fresh ones; no sensitivity saved means none loaded.
    save_stats(tmp_path / "bare.safetensors", stats)
    again, none = load_stats(tmp_path / "bare.safetensors")
    assert none is None
    _assert_stats_close(merge_stats(loaded, again), [s + s for s in stats], 0.0)


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a STAT statistics file"):
        load_stats(tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        load_stats(tmp_path / "junk.safetensors")


# --- sharding ------------------------------------------------------------------------------------

def test_shards_cover_the_windows_once_and_keep_whole_batches():
    for n, batch, world in [(8, 2, 2), (9, 2, 2), (64, 8, 3), (5, 8, 2), (7, 1, 7), (10, 4, 3)]:
        ranges = [distributed.shard_range(n, batch, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap, no gap
        assert all(stop > start for start, stop in ranges)
        if -(-n // batch) >= world:  # enough batches: every share starts on a batch boundary
            assert all(start % batch == 0 for start, _ in ranges)
    # The sensitivity pass may leave a rank without windows; the calibration may not.
    assert distributed.shard_range(1, 4, 1, 2, allow_empty=True) == (1, 1)
    with pytest.raises(ValueError, match="1 calibration window cannot be shared among 2 processes"):
        distributed.shard_range(1, 4, 0, 2)


# --- two processes (gloo) against one ------------------------------------------------------------

def _cases():
    """(name, model builder, data, config); rebuilt identically in every process."""
    llama_cfg = dict(sparsity=0.3, sensitivity_samples=4, batch_size=2)
    return [
        ("llama-one-shot", lambda: tiny_model("llama"), _windows(), PruneConfig(**llama_cfg, sensitivity_labels="model")),
        # One sensitivity window for two processes: rank 1's gradient pass has nothing to do.
        ("llama-propagate", lambda: tiny_model("llama"), _windows(),
         PruneConfig(**{**llama_cfg, "sensitivity_samples": 1}, mode="propagate")),
        ("bert-one-shot", lambda: tiny_classifier("bert"), padded_set(n=8),
         PruneConfig(sparsity=0.3, sensitivity_samples=8, batch_size=2)),
        # Peers calibrate through the same sharded runner: FLAP (fluctuation from the merged sums) and
        # SlimGPT (the merged Grams as its Hessians, with its OBS correction).
        ("llama-flap", lambda: tiny_model("llama"), _windows(), PruneConfig(**llama_cfg, method="flap")),
        ("llama-slimgpt", lambda: tiny_model("llama"), _windows(), PruneConfig(**llama_cfg, method="slimgpt")),
    ]


def _plan_and_weights(result, model):
    kept = [(lp.kept_heads, lp.kept_kv_heads, lp.kept_neurons) for lp in result.plan.layers]
    return {"kept": kept, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _cli_args(folder, out):
    # An explicit text: the default recipe fits corrections on a second text in one process only.
    return [str(folder), "--sparsity", "0.3", "--out", str(out), "--num-samples", "8", "--seq-len", "32",
            "--calibration", "wikipedia",
            "--sensitivity-samples", "4", "--batch-size", "2", "--skip-eval", "--quiet", "--device", "cpu"]


def _worker(rank, world, port, out_dir, cli_folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, build, data, config in _cases():
            model = build()
            result = stat_prune_(model, data, config)
            if result.plan is not None:
                results[name] = _plan_and_weights(result, model)
            else:  # is this rank's model still the dense one?
                dense = build().state_dict()
                results[name] = {"info": result.info, "dense": all(torch.equal(v, dense[k])
                                                                   for k, v in model.state_dict().items())}
        # More processes than calibration windows, and a whole-model method: one sentence each.
        for key, data, config in [("too-few", _windows(n=1), PruneConfig(sparsity=0.3, sensitivity_samples=0)),
                                  ("slicegpt", _windows(), PruneConfig(sparsity=0.3, method="slicegpt"))]:
            try:
                stat_prune_(tiny_model("llama"), data, config)
                results[key] = None
            except ValueError as exc:
                results[key] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Last, the command line as torchrun runs it (it leaves the process group when done).
        from stat_core.cli import main

        rc = main(_cli_args(cli_folder, os.path.join(out_dir, "cli")))
        torch.save(rc, os.path.join(out_dir, f"cli-rc{rank}.pt"))
    finally:
        distributed.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    """A tiny random Llama with the demo model's real tokenizer, saved for the command line."""
    from transformers import AutoTokenizer

    from stat_core.models import prepare_demo_model

    tok = AutoTokenizer.from_pretrained(prepare_demo_model("smollm2-135m"))
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, cli_folder):
    """One 2-process gloo run (``torch.multiprocessing.spawn``) of every case; returns its folder."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out), str(cli_folder)), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def two_process_results(spawned):
    return [torch.load(spawned / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", ["llama-one-shot", "llama-propagate", "bert-one-shot", "llama-flap", "llama-slimgpt"])
def test_two_processes_give_the_one_process_plan_and_weights(two_process_results, case):
    name, build, data, config = next(c for c in _cases() if c[0] == case)
    model = build()
    single = _plan_and_weights(stat_prune_(model, data, config), model)
    main = two_process_results[0][case]
    assert main["kept"] == single["kept"]
    assert any(len(n) < 64 for _, _, n in single["kept"])  # something was actually pruned
    assert main["state"].keys() == single["state"].keys()
    for key, want in single["state"].items():
        got = main["state"][key]
        assert got.shape == want.shape, key
        assert float((got - want).norm()) <= 1e-6 * max(float(want.norm()), 1e-12), key
    other = two_process_results[1][case]
    if config.mode == "one-shot":  # rank 1 only calibrated: its model is still dense
        assert other["info"] == {"distributed_rank": 1, "world_size": WORLD} and other["dense"]
    else:  # propagate: every rank pruned its copy the same way
        assert other["kept"] == single["kept"]


def test_more_processes_than_windows_and_whole_model_methods_say_so(two_process_results):
    for results in two_process_results:
        assert results["too-few"] == ("1 calibration window cannot be shared among 2 processes (each needs at least "
                                      "one): start at most 1 process or give more calibration windows (--num-samples)")
        assert "cannot be spread over processes; run it in one process" in results["slicegpt"]


def test_command_line_under_two_processes_matches_one(spawned, cli_folder, tmp_path):
    import json

    from safetensors.torch import load_file

    from stat_core.cli import main

    assert [torch.load(spawned / f"cli-rc{r}.pt") for r in range(WORLD)] == [0, 0]
    assert main(_cli_args(cli_folder, tmp_path / "one")) == 0
    two, one = spawned / "cli", tmp_path / "one"
    report = json.loads((two / "pruning_report.json").read_text())
    assert report["distributed"] == {"processes": 2, "backend": "gloo"}
    assert report["calibration_tokens"] == 8 * 32  # the whole set, not rank 0's shard
    kept = [[(l["kept_heads"], l["kept_neurons"]) for l in json.loads((d / "plan.json").read_text())["layers"]]
            for d in (two, one)]
    assert kept[0] == kept[1]
    w2, w1 = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert w2.keys() == w1.keys()
    for key in w1:
        assert float((w2[key] - w1[key]).norm()) <= 1e-6 * max(float(w1[key].norm()), 1e-12), key
