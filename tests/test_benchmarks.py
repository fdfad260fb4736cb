"""The benchmark scripts in their smallest setting (random tiny models, no downloads), so they cannot
rot, and the Torch-Pruning workaround checked against the project's own surgery."""

import copy
import importlib
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def bench(name):
    """The benchmark module ``benchmarks.<name>`` (the repository root is on sys.path: pyproject's
    ``pythonpath``), as ``python -m benchmarks.<name>`` runs it."""
    return importlib.import_module(f"benchmarks.{name}")


@pytest.mark.parametrize("family,kind", [("llama", "magnitude"), ("llama", "activation"), ("qwen2", "activation")])
def test_torch_pruning_matches_hand_built_model(family, kind, windows):
    """Torch-Pruning's cut (its importance + its prune functions on hand-built groups) equals the
    project's own surgery applied to the same kept indices: same shapes, same logits."""
    pytest.importorskip("torch_pruning")
    tp_peer = bench("tp_peer")
    from stat_core.surgery.plan import LayerPlan, PrunePlan
    from stat_core.config import PruneConfig
    from stat_core.surgery.apply import apply_plan_
    from stat_core.pipeline import calibrate, plan_pruning

    dense = tiny_model(family, num_attention_heads=4, num_key_value_heads=2)
    calib = calibrate(dense, windows, PruneConfig(sparsity=0.0, sensitivity_samples=2))
    plan = plan_pruning(dense, calib, PruneConfig(sparsity=0.4))
    assert any(len(lp.kept_heads) < lp.num_heads for lp in plan.layers)  # heads really go

    pruned = copy.deepcopy(dense)
    sums = tp_peer.accumulate_activation_importance(pruned, windows) if kind == "activation" else None
    kept = tp_peer.tp_prune_like_plan_(pruned, plan, kind, sums)["layers"]
    for lp, k in zip(plan.layers, kept):  # STAT's per-layer counts
        assert (len(k["heads"]), len(k["kv_heads"]), len(k["neurons"])) == \
            (len(lp.kept_heads), len(lp.kept_kv_heads), len(lp.kept_neurons))

    by_hand = copy.deepcopy(dense)
    hand_plan = PrunePlan(**{**plan.__dict__, "layers": [
        LayerPlan(**{**lp.__dict__, "kept_heads": k["heads"], "kept_kv_heads": k["kv_heads"], "kept_neurons": k["neurons"]})
        for lp, k in zip(plan.layers, kept)]})
    apply_plan_(by_hand, hand_plan, None)
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in by_hand.parameters()]
    with torch.no_grad():
        torch.testing.assert_close(pruned(windows).logits, by_hand(windows).logits, rtol=0, atol=0)


def test_torch_pruning_magnitude_ranks_like_group_norm(windows):
    """TP's MagnitudeImportance on the hand-built MLP group is the summed squared row/column norm
    (mean over members), i.e. the same ranking as the project's magnitude baseline."""
    pytest.importorskip("torch_pruning")
    tp_peer = bench("tp_peer")
    from stat_core.adapters import get_adapter
    from stat_core.methods.baselines import magnitude_scores

    model = tiny_model("llama")
    adapter = get_adapter(model)
    score = tp_peer._score(tp_peer.importance_object("magnitude"), tp_peer.mlp_members(adapter, 0), 64)
    assert torch.equal(torch.argsort(score, descending=True),
                       torch.argsort(magnitude_scores(adapter, 0)[2], descending=True))


def test_quality_tiny(tmp_path):
    pytest.importorskip("torch_pruning")
    assert bench("quality").main(["--tiny", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality.json").read_text())
    methods = {r["method"] for r in data["records"]}
    assert methods == {"dense", "stat", "no-correction", "magnitude", "activation-norm", "tp-magnitude", "tp-activation"}
    for r in data["records"]:
        assert r["perplexity"] > 1 and 0 <= r["removed_fraction"] < 1
        if r["method"] != "dense":
            assert abs(r["removed_fraction"] - r["budget"]) < 0.02
    assert "| 20% |" in (tmp_path / "quality.md").read_text()


def test_cost_tiny(tmp_path):
    assert bench("cost").main(["--tiny", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cost.json").read_text())
    assert len(data["records"]) == 4 and all(r["seconds_prune"] > 0 and r["seconds_forward"] > 0 for r in data["records"])
    assert len(data["fits"]) == 2
    assert "time ÷ forward" in (tmp_path / "cost.md").read_text()


def test_speed_tiny(tmp_path):
    assert bench("speed").main(["--tiny", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "speed.json").read_text())
    dense, pruned = data["records"]
    assert dense["method"] == "dense" and pruned["method"] == "stat"
    assert pruned["ideal_prefill"] > 1 and pruned["ideal_decode"] > 1 and pruned["decode_tok_s"] > 0


def test_app_timings_tiny_with_the_suite(tmp_path):
    """One user's session timed step by step through the handlers, with ``--compare-suite``: the Compare
    step with the suite ticked is timed and its table kept."""
    assert bench("app_timings").main(["--tiny", "--compare-suite", "stat,magnitude", "--out-dir", str(tmp_path),
                                      "--name", "with_suite"]) == 0
    data = json.loads((tmp_path / "with_suite.json").read_text())
    steps = [r["step"] for r in data["records"]]
    assert steps[0] == "load" and steps[-1] == "export zip" and len(steps) == 8, steps
    seconds = {r["step"]: r["seconds"] for r in data["records"]}
    assert all(s > 0 for s in seconds.values()), seconds
    first = next(s for k, s in seconds.items() if k.startswith("first calibration"))
    replan = next(s for k, s in seconds.items() if k.endswith("new plan from cached statistics"))
    assert replan < first, seconds   # the re-budget reuses the statistics instead of re-calibrating
    step = next(r for r in data["records"] if r["step"].startswith("compare at 30% with the suite"))
    assert step["table"]["headers"][4:6] == ["KL to dense", "few-shot acc"]
    assert [row[0].split(" ")[0] for row in step["table"]["rows"]] == ["dense", "STAT", "magnitude"]
    report = (tmp_path / "with_suite.md").read_text()
    assert "re-budget to 50%" in report and "few-shot AUC" in report


def test_stat_experiments_variants_change_only_what_they_say(windows):
    """The experiments' variants on a tiny model, through the library's own parameters (nothing patched):
    ``shrunk_analyses`` at the library's λ = 0.1 gives the library's analyses and another λ other ones;
    STAT's steps composed with unweighted options give the library's plan; ``keep-last:1`` leaves the
    last layer whole at the same budget; a huge attention weight keeps every head."""
    import stat_core.pipeline as P
    from stat_core.methods.stat import analysis as A
    from stat_core.adapters import get_adapter
    from stat_core.surgery.budget import allocate

    exp = bench("stat_experiments")
    model = tiny_model(num_hidden_layers=3)
    config = P.PruneConfig(sparsity=0.3)
    calibration = P.calibrate(model, windows, config)
    adapter = get_adapter(model)
    same = exp.shrunk_analyses(adapter, calibration, 0.1)
    for a, b in zip(same, calibration.analyses):
        assert a.head_order == b.head_order and torch.equal(a.neuron_order, b.neuron_order)
        assert torch.equal(a.mlp_damage, b.mlp_damage)
    other = exp.shrunk_analyses(adapter, calibration, 0.9)
    assert any(not torch.equal(a.mlp_damage, b.mlp_damage) for a, b in zip(other, calibration.analyses))

    def plan(variant=None):
        blocks = A.build_block_options(adapter, calibration.analyses, config)
        if variant is not None:
            blocks = exp.reweighted(blocks, variant, config)
        return A.plan_from_choice(adapter, calibration.analyses, blocks, allocate(blocks, 0.3), config, "tiny", {})

    library = A.plan_from_analyses(adapter, calibration.analyses, config, "tiny", {})
    assert [(lp.kept_heads, lp.kept_neurons) for lp in plan().layers] == \
        [(lp.kept_heads, lp.kept_neurons) for lp in library.layers]
    kept = plan("keep-last:1").layers[-1]
    assert len(kept.kept_heads) == kept.num_heads and len(kept.kept_neurons) == kept.intermediate_size
    assert all(len(lp.kept_heads) == lp.num_heads for lp in plan("attn:1e12").layers)
    with pytest.raises(SystemExit, match="unknown allocation variant 'nonsense:1'"):
        exp.reweighted([], "nonsense:1", config)


@pytest.mark.parametrize("kind", ["magnitude", "activation"])
def test_torch_pruning_matches_hand_built_encoder(kind):
    """Same check on a BERT classifier (multi-head attention: q, k, v rows and o columns per head)."""
    pytest.importorskip("torch_pruning")
    from test_encoders import padded_set, tiny_classifier

    tp_peer = bench("tp_peer")
    from stat_core.surgery.plan import LayerPlan, PrunePlan
    from stat_core.config import PruneConfig
    from stat_core.surgery.apply import apply_plan_
    from stat_core.pipeline import calibrate, plan_pruning

    dense = tiny_classifier("bert")
    data = padded_set()
    calib = calibrate(dense, data, PruneConfig(sparsity=0.0, sensitivity_samples=4))
    plan = plan_pruning(dense, calib, PruneConfig(sparsity=0.4))
    pruned = copy.deepcopy(dense)
    sums = tp_peer.accumulate_activation_importance(pruned, data) if kind == "activation" else None
    kept = tp_peer.tp_prune_like_plan_(pruned, plan, kind, sums)["layers"]
    by_hand = copy.deepcopy(dense)
    apply_plan_(by_hand, PrunePlan(**{**plan.__dict__, "layers": [
        LayerPlan(**{**lp.__dict__, "kept_heads": k["heads"], "kept_kv_heads": k["kv_heads"], "kept_neurons": k["neurons"]})
        for lp, k in zip(plan.layers, kept)]}), None)
    inputs = data.model_inputs("cpu")
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).logits, by_hand(**inputs).logits, rtol=0, atol=0)


def test_suite_method_variants_are_configs():
    """``--methods 'flap[metric=WIFN]'``: a method with its own settings is a row of its own, its
    settings parsed by the method's settings dataclass (a bad one is one sentence)."""
    from stat_core.methods.flap import FlapSettings
    from stat_core.methods.slimgpt import SlimGPTSettings

    variant = bench("suite").method_variant
    assert variant("flap") == ("flap", None)
    assert variant("flap[metric=WIFN]") == ("flap", FlapSettings(metric="WIFN"))
    assert variant("slimgpt[percdamp=0.05;first_to_last=0.5]") == ("slimgpt", SlimGPTSettings(0.05, 0.5))
    with pytest.raises(ValueError, match="FLAP's metric is one of"):
        variant("flap[metric=nope]")


def _cell_specs():
    from stat_core.methods.registry import get_method, method_names

    # every method the suite runs unasked (trained ones run by name only), and a setting that only
    # the method's finishing step applies (STAT's output prior: a row once measured without it)
    return [m for m in method_names() if not get_method(m).needs_training] + ["stat[output_prior=true]"]


@pytest.mark.parametrize("spec", _cell_specs())
def test_a_suite_row_is_the_model_the_library_prunes(spec, windows):
    """The suite's cell (one shared calibration, then each method's plan and cut) and the library's
    one orchestrator (:func:`stat_core.pipeline.stat_prune_`, calibrating only what the method needs)
    give the same model, logits equal to the bit, for every method."""
    from stat_core.config import PruneConfig
    from stat_core.pipeline import stat_prune_

    suite = bench("suite")
    model = tiny_model("llama", num_hidden_layers=2)
    base, settings = suite.method_variant(spec)
    config = PruneConfig(sparsity=0.3, method=base, settings=settings)
    calib = suite.shared_calibration(model, windows, config)
    row, _, _ = suite.prune_cell(model, windows, config, calib)
    library = copy.deepcopy(model)
    stat_prune_(library, windows, config)
    with torch.no_grad():
        a, b, dense = row(windows[:3]).logits, library(windows[:3]).logits, model(windows[:3]).logits
    assert not torch.equal(a, dense)  # something was cut
    assert torch.equal(a, b), (a - b).abs().max()


def test_suite_tiny(tmp_path):
    """benchmarks/suite.py end to end on a random tiny Llama: every registered method at two budgets,
    one record each plus dense, with every suite field, and a markdown table naming the best."""
    import json

    from stat_core.methods.registry import get_method, method_names
    from stat_core.evaluation.suite import SUITE_FIELDS

    assert bench("suite").main(["--tiny", "--calibration", "wikipedia", "--out-dir", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "suite.json").read_text())["records"]
    names = [m for m in method_names() if not get_method(m).needs_training]  # trained ones: by name only
    assert {r["method"] for r in records} == {"dense", *names}
    assert len(records) == 1 + 2 * len(names)
    for r in records:
        assert set(SUITE_FIELDS) <= set(r) and r["model"] == "tiny-llama"
        if r["method"] != "dense":
            assert abs(r["removed_fraction"] - r["budget"]) < 0.03, r
    dense = next(r for r in records if r["method"] == "dense")
    assert dense["kl_to_dense"] == 0.0 and dense["instruction_agreement"] == 1.0
    assert "Best per budget" in (tmp_path / "suite.md").read_text()


def test_suite_tiny_at_the_default_calibration_over_seeds(tmp_path):
    """--calibration default (the recipe the CLI and the app choose: for a chat tokenizer, units on the
    model's own chat text with its own Fisher, corrections on Wikipedia) at two window seeds: one
    record per method × budget × seed, the dense row once, and tables of seed means with half the
    range; whole-model methods run on the recipe's text alone."""
    s = bench("suite")
    assert s.main(["--tiny", "--methods", "stat,slicegpt", "--seeds", "0,1", "--name", "seeds",
                   "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "seeds.json").read_text())
    records = data["records"]
    cells = [(r["method"], r["budget"], r.get("seed")) for r in records if r["method"] != "dense"]
    assert sorted(cells) == sorted((m, b, seed) for m in ("stat", "slicegpt") for b in (0.2, 0.4)
                                   for seed in (0, 1))
    assert [r["method"] for r in records].count("dense") == 1
    assert {r["calibration"] for r in records if r["method"] != "dense"} == {"default"}
    assert "corrections fitted on 'wikipedia'" in data["meta"]["calibrations"]["tiny-llama / default"]
    stat = {r["seed"]: r for r in records if r["method"] == "stat" and r["budget"] == 0.2}
    assert stat[0]["kept"] != stat[1]["kept"] or stat[0]["perplexity"] != stat[1]["perplexity"]  # other windows
    md = (tmp_path / "seeds.md").read_text()
    assert "calibration **default**" in md and "mean over the calibration seeds it names (± half the range)" in md
    mean = (stat[0]["perplexity"] + stat[1]["perplexity"]) / 2
    row = next(line for line in md.splitlines() if line.startswith("| 20% | stat |"))
    assert row.startswith("| 20% | stat | 0, 1 |") and s._fmt("perplexity", mean) in row and "±" in row
    # the seeds' cell keeps its budget exactly (a mean of 0.2s would make a second "20%" row)
    best = md[md.index("Best per budget"):]
    assert best.count("| 20% |") == 1 and best.count("| 40% |") == 1


def test_suite_tiny_recover(tmp_path):
    """suite.py --recover: every cell also measured after recovery, as '<method>+recovery', with the
    recovery's time added to the method's and recorded apart; the pruned shapes are unchanged."""
    assert bench("suite").main(["--tiny", "--methods", "stat", "--recover", "2", "--name", "rec",
                                "--calibration", "wikipedia", "--out-dir", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "rec.json").read_text())["records"]
    assert [r["method"] for r in records] == ["dense", "stat", "stat+recovery", "stat", "stat+recovery"]
    for plain, rec in zip(records[1::2], records[2::2]):
        assert rec["budget"] == plain["budget"] and rec["removed_fraction"] == plain["removed_fraction"]
        assert rec["recover"]["steps"] == 2 and rec["seconds_recover"] > 0
        assert rec["seconds_prune"] == pytest.approx(plain["seconds_prune"] + rec["seconds_recover"])
    md = (tmp_path / "rec.md").read_text()
    assert "| stat+recovery |" in md and "of which recovery s" in md


def test_suite_tiny_recover_only(tmp_path):
    """--recover-only measures only the recovered cells; --plain-from copies the plain ones of an earlier
    run (marked with their file), and their plans match the recovered records'."""
    s = bench("suite")
    assert s.main(["--tiny", "--methods", "stat", "--name", "plain", "--calibration", "wikipedia",
                   "--out-dir", str(tmp_path)]) == 0
    assert s.main(["--tiny", "--methods", "stat", "--recover", "1", "--recover-only", "--name", "rec",
                   "--calibration", "wikipedia", "--out-dir", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "rec.json").read_text())["records"]
    assert [r["method"] for r in records] == ["dense", "stat+recovery", "stat+recovery"]
    rec = s.Recorder(tmp_path, {}, append=True, name="rec")
    assert s.copy_plain_records(rec, tmp_path / "plain.json", "tiny-llama", ["stat"], [0.2, 0.4]) == 3
    by = {(r["method"], r["budget"]): r for r in json.loads((tmp_path / "rec.json").read_text())["records"]}
    for b in (0.2, 0.4):
        assert by["stat", b]["from"] == "plain.json" and by["stat", b]["kept"] == by["stat+recovery", b]["kept"]


def test_stat_experiments_cache_is_keyed_and_never_unpickled(tmp_path, windows):
    """The experiments' cache: one folder per (model, windows, suite config) in the given root (the
    project's cache dir by default, not a fixed file in /tmp), safetensors + JSON only; what it loads
    back evaluates exactly like what was saved."""
    import dataclasses

    import stat_core.pipeline as P
    from conftest import save_tiny_llama_with_demo_tokenizer
    from stat_core.models import load_model
    from stat_core.evaluation.suite import SuiteConfig, build_reference, evaluate_suite

    exp = bench("stat_experiments")
    source = (BENCH / "stat_experiments.py").read_text()
    assert "torch.load" not in source and "weights_only=False" not in source and "/tmp" not in source
    import shutil

    from stat_core.models import demo_model_dir

    folder = save_tiny_llama_with_demo_tokenizer(tmp_path / "m")
    shutil.copy(demo_model_dir("smollm2-135m") / "chat_template.jinja", folder)  # the instruction part too
    model, tok = load_model(str(folder))
    suite = SuiteConfig(eval_tokens=128, window=64, analogies_per_category=1, max_fewshot_prompts=4,
                        max_instruction_prompts=2, instruction_new_tokens=2)
    reference = build_reference(model, tok, suite)
    calibration = P.calibrate(model, windows, P.PruneConfig(sparsity=0.2, sensitivity_samples=2))
    folder = exp.cache_folder(model, windows, suite, tmp_path / "cache")
    assert exp.load_cache(folder, model) is None
    exp.save_cache(folder, calibration, reference)
    assert sorted(p.name for p in folder.iterdir()) == ["reference.json", "reference.safetensors",
                                                        "statistics.safetensors"]
    cal2, ref2 = exp.load_cache(folder, model)
    for a, b in zip(cal2.analyses, calibration.analyses):
        assert a.head_order == b.head_order and torch.equal(a.neuron_order, b.neuron_order)
    for f in dataclasses.fields(reference):
        x, y = getattr(reference, f.name), getattr(ref2, f.name)
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else
                all(torch.equal(u, v) for u, v in zip(x, y, strict=True)) if f.name == "instruction_logprobs"
                else x == y), f.name
    assert reference.instruction_logprobs and reference.analogy_questions and reference.fewshot_sequences
    assert evaluate_suite(model, tok, ref2) == evaluate_suite(model, tok, reference)
    other = tiny_model(seed=1)
    assert exp.cache_folder(other, windows, suite, tmp_path / "cache") != folder
    assert exp.cache_folder(model, windows[:4], suite, tmp_path / "cache") != folder


def test_calibration_needs_tiny(tmp_path):
    """benchmarks/calibration_needs.py: per method, the calibration it computes now beside STAT's whole
    calibration that every method once paid; FLAP computes statistics only, LLM-Pruner nothing."""
    assert bench("calibration_needs").main(["--tiny", "--repeats", "1", "--methods", "stat,flap,llm-pruner",
                                            "--out-dir", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "calibration_needs.json").read_text())["rows"]}
    assert rows["flap"]["needs"] == ["block_stats"] and rows["llm-pruner"]["needs"] == []
    assert rows["stat"]["needs"] == ["analyses", "block_stats", "sensitivity"]
    assert rows["llm-pruner"]["after_s"] < rows["llm-pruner"]["before_s"]
    assert "| flap | block_stats |" in (tmp_path / "calibration_needs.md").read_text()


def test_seed_means_keep_the_cells_budget_exactly():
    """Three seeds of a 20% cell are one row at exactly 0.2 (a mean of 0.2s is 0.20000000000000004,
    which the tables showed as a second "20%" row beside the peers' single-seed rows)."""
    s = bench("suite")
    rows = [{"model": "m", "method": "stat", "budget": 0.2, "calibration": "default", "seed": k,
             "perplexity": 10.0 + k} for k in range(3)]
    (row,) = s.seed_means(rows)
    assert row["budget"] == 0.2 and row["seeds"] == [0, 1, 2] and row["perplexity"] == 11.0
    assert row["spread"]["perplexity"] == 1.0
