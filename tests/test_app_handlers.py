"""The app's handlers as plain functions, on tiny random models saved to temporary folders."""

import dataclasses
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from stat_app import handlers as H
from stat_app.sessions import Session, SessionStore

from conftest import tiny_model

LOREM = ("The history of the river valley begins with small farming villages along the banks. Over the "
         "centuries trade routes crossed the region and towns grew around markets, bridges and mills. ")


def smollm2_tokenizer_files():
    from stat_core.models import demo_model_dir

    src = demo_model_dir("smollm2-135m")
    if not (src / "tokenizer.json").exists():
        pytest.fail(f"the demo model cache {src} has no tokenizer; run scripts/setup.sh")
    return [src / n for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja") if (src / n).exists()]


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A tiny random Llama (hidden 32, 2 layers, 4 heads on 2 KV heads) with the SmolLM2 tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=49152, max_position_embeddings=512).save_pretrained(path)
    for f in smollm2_tokenizer_files():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random BERT sequence classifier with the demo classifier's tokenizer."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from stat_core.models import demo_model_dir

    src = demo_model_dir("minilm-classifier")
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=30522, max_position_embeddings=256, num_labels=2)
    AutoModelForSequenceClassification.from_config(cfg).eval().save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    return path


@pytest.fixture(scope="module")
def calibrated(decoder_dir):
    """A session with the tiny decoder loaded and calibrated on pasted text (shared, read-only use)."""
    s = Session(key="calibrated")
    assert H.load(s, "folder", str(decoder_dir)).ok
    r = H.calibrate(s, "pasted", pasted=LOREM * 40, num_samples=8, seq_len=64)
    assert r.ok, r.message
    yield s
    s.close()  # removes its export folder


def one_sentence(reply):
    assert not reply.ok
    assert reply.message and "\n" not in reply.message and "Traceback" not in reply.message
    return reply.message


# --- load ----------------------------------------------------------------------------------------

def test_load_tiny_decoder_shows_architecture(decoder_dir):
    s = Session()
    r = H.load(s, "folder", str(decoder_dir))
    assert r.ok, r.message
    a = r["arch"]
    assert (a["family"], a["layers"], a["heads"], a["kv_heads"], a["mlp_width"]) == ("llama", 2, 4, 2, 64)
    assert a["device"] == "cpu" and a["kind"] == "decoder"
    assert a["parameters"] == sum(p.numel() for p in s.model.parameters())
    md = H.architecture_markdown(a)
    assert "4 / 2" in md and "64" in md


def test_load_bad_inputs_give_one_sentence(tmp_path):
    from transformers import BloomConfig  # (GPT-2, the earlier example, is supported now)

    s = Session()
    msg = one_sentence(H.load(s, "folder", str(tmp_path / "missing")))
    assert "does not exist" in msg
    (tmp_path / "empty").mkdir()
    assert "config.json" in one_sentence(H.load(s, "folder", str(tmp_path / "empty")))
    BloomConfig(hidden_size=32, n_layer=1, n_head=2).save_pretrained(tmp_path / "bloom")
    msg = one_sentence(H.load(s, "folder", str(tmp_path / "bloom")))
    assert "bloom" in msg and "not supported" in msg and "llama" in msg
    assert "demo models" in one_sentence(H.load(s, "demo", "no-such-demo"))
    assert one_sentence(H.load(s, "hub", ""))
    assert s.model is None  # nothing half-loaded


def test_handlers_before_loading_say_what_to_do():
    s = Session()
    assert "Load a model" in one_sentence(H.calibrate(s, "pasted", pasted=LOREM))
    assert "Load a model" in one_sentence(H.prune(s, 0.3))
    assert "Load a model" in one_sentence(H.measure(s))
    assert "Load a model" in one_sentence(H.export(s))
    assert "Load a model" in one_sentence(H.replan(s, 0.3))


# --- calibrate -----------------------------------------------------------------------------------

def test_calibration_text_problems(decoder_dir, tmp_path):
    s = Session()
    assert H.load(s, "folder", str(decoder_dir)).ok
    assert "Calibrate first" in one_sentence(H.prune(s, 0.3))
    assert "empty" in one_sentence(H.calibrate(s, "pasted", pasted="   "))
    msg = one_sentence(H.calibrate(s, "pasted", pasted="too short", num_samples=4, seq_len=64))
    assert "fewer than one window" in msg
    assert "does not exist" in one_sentence(H.calibrate(s, "file", file_path=str(tmp_path / "nope.txt")))
    (tmp_path / "data.xlsx").write_text("x")
    assert "Unsupported" in one_sentence(H.calibrate(s, "file", file_path=str(tmp_path / "data.xlsx")))
    assert one_sentence(H.calibrate(s, "pasted", pasted=LOREM * 5, num_samples=0, seq_len=64))
    assert "classifiers" in one_sentence(H.calibrate(s, "builtin", builtin="newsgroups"))
    assert s.calibration is None
    # long enough for one window but not for the request: a warning, not an error
    r = H.calibrate(s, "pasted", pasted=LOREM * 3, num_samples=16, seq_len=64)
    assert r.ok and r["warning"].startswith("Warning") and "overlap" in r.message


def test_calibration_from_file(decoder_dir, tmp_path):
    s = Session()
    assert H.load(s, "folder", str(decoder_dir)).ok
    f = tmp_path / "text.jsonl"
    f.write_text("\n".join(json.dumps({"text": LOREM * 3}) for _ in range(10)))
    r = H.calibrate(s, "file", file_path=str(f), num_samples=4, seq_len=64)
    assert r.ok and "overlap" not in r["warning"], r.message
    # 256 tokens for 64-neuron MLPs: enough to run, too few for trustworthy corrections, and it says so
    assert "calibration tokens" in r["warning"]
    assert s.calib_info["source"] == "text.jsonl" and s.calibration is not None


# --- prune and re-budget -------------------------------------------------------------------------

def test_prune_and_rebudget_reuse_the_calibration(calibrated, monkeypatch):
    s = calibrated
    dense_state = {k: v.clone() for k, v in s.model.state_dict().items()}
    calib = s.calibration
    calls = []
    real = H.pipeline.calibrate
    monkeypatch.setattr(H.pipeline, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))

    r30 = H.prune(s, 0.3)
    assert r30.ok, r30.message
    plan30 = r30["plan"]
    assert abs(r30["report"]["block_params_removed_fraction"] - 0.3) < 0.05
    r60 = H.prune(s, 60)  # percent accepted
    assert r60.ok, r60.message
    plan60 = r60["plan"]
    assert calls == [] and s.calibration is calib  # re-budget never re-calibrates
    assert plan60.kept_summary() != plan30.kept_summary()
    assert sum(len(lp.kept_neurons) for lp in plan60.layers) < sum(len(lp.kept_neurons) for lp in plan30.layers)
    assert r60["report"]["params_after"] < r30["report"]["params_after"]
    # the dense model is untouched; the pruned copy is smaller
    for k, v in s.model.state_dict().items():
        assert torch.equal(v, dense_state[k]), k
    assert s.pruned is not s.model
    assert s.pruned.model.layers[0].mlp.down_proj.in_features == len(plan60.layers[0].kept_neurons)

    # the slider's re-budget: a plan only (no calibration, no surgery); the copy is built on demand
    r45 = H.replan(s, 0.45)
    assert r45.ok and s.pruned is None and calls == []
    predicted = r45["report"]["block_params_after"], r45["report"]["params_after"]
    assert H.measure(s, eval_tokens=256).ok and s.pruned is not None
    assert (s.report["block_params_after"], s.report["params_after"]) == predicted
    assert sum(p.numel() for p in s.pruned.parameters()) == predicted[1]

    # same request again: calibration cached, not recomputed
    again = H.calibrate(s, "pasted", pasted=LOREM * 40, num_samples=8, seq_len=64)
    assert again.ok and again["cached"] and calls == []
    both = H.calibrate_and_prune(s, dict(source="pasted", pasted=LOREM * 40, num_samples=8, seq_len=64),
                                 dict(sparsity=0.2))
    assert both.ok and "cached" in both.message and calls == []


def test_prune_options_and_impossible_budget(calibrated):
    s = calibrated
    msg = one_sentence(H.prune(s, 0.99))
    assert "cannot remove 99%" in msg
    fresh = Session(model=s.model, tokenizer=s.tokenizer, model_name=s.model_name)
    calls = []
    msg = one_sentence(H.calibrate_and_prune(fresh, {"source": "pasted", "pasted": LOREM * 20}, {"sparsity": 0.99},
                                             progress=lambda *a: calls.append(a)))
    assert "cannot remove 99%" in msg and calls == [] and fresh.calibration is None  # refused before calibrating
    assert one_sentence(H.prune(s, 0.3, budget_kind="bogus"))
    u = H.prune(s, 0.3, uniform=True)
    assert u.ok, u.message
    counts = {(len(lp.kept_heads), len(lp.kept_neurons)) for lp in u["plan"].layers}
    assert len(counts) == 1
    f = H.prune(s, 0.3, budget_kind="flops")
    assert f.ok and abs(f["report"]["block_flops_removed_fraction"] - 0.3) < 0.05
    p = H.prune(s, 0.3, mode="propagate", progress=lambda *a: None)
    assert p.ok and p["plan"].mode == "propagate"


def test_method_settings_from_the_settings_box(calibrated):
    """The app's settings box: name=value text read by the method's own settings dataclass."""
    s = calibrated
    assert H.settings_help("stat").startswith("STAT: search=0, search_seed=0, output_prior=False")
    assert H.settings_help("flap") == "FLAP: metric=WIFV"
    assert H.settings_help("wanda-sp") == "Wanda-sp has no settings of its own."
    r = H.prune(s, 0.3, method="slimgpt", settings="percdamp=0.05, first_to_last = 0.5")
    assert r.ok, r.message
    assert r["plan"].budget["settings"] == {"percdamp": 0.05, "first_to_last": 0.5}
    assert "not a setting of STAT; write name=value with one of: search, search_seed, output_prior" in \
        one_sentence(H.prune(s, 0.3, settings="bogus=1"))
    assert "STAT's output_prior is true or false, got 'maybe'" in one_sentence(H.prune(s, 0.3, settings="output_prior=maybe"))
    assert "Wanda-sp has no settings of its own" in one_sentence(H.replan(s, 0.3, method="wanda-sp", settings="x=1"))
    r = H.replan(s, 0.3, method="flap", settings="metric=WIFN")
    assert r.ok and r["plan"].budget["settings"] == {"metric": "WIFN"}, r.message
    assert "FLAP's metric is one of WIFV, WIFN, IFV" in one_sentence(H.replan(s, 0.3, method="flap", settings="metric=x"))
    assert "percdamp must be > 0" in one_sentence(H.replan(s, 0.3, method="slimgpt", settings="percdamp=-1"))
    # the slider re-plans without a budget search (minutes), and says so; its other settings apply
    r = H.replan(s, 0.3, settings="search=8, protect_induction=2")
    assert r.ok and "without the budget search" in r.message and "search" not in r["plan"].budget, r.message
    assert r["plan"].method == "stat"
    # STAT's output prior reaches the pruned copy, whether it is cut with the prune or after it
    from stat_core.surgery.output_prior import output_prior

    for cut in (True, False):
        r = H.prune(s, 0.3, settings="output_prior=true", cut=cut)
        assert r.ok, r.message
        assert (s.pruned is not None) == cut
        assert H.cut_copy(s).ok and output_prior(s.pruned) is not None and s.pruned.config.stat_output_prior
    assert output_prior(s.model) is None  # the dense model untouched
    assert H.prune(s, 0.3).ok and output_prior(s.pruned) is None


def test_cancel_leaves_dense_model_intact(decoder_dir):
    import threading

    s = Session()
    assert H.load(s, "folder", str(decoder_dir)).ok
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    ev = threading.Event()
    seen = []

    def progress(stage, done, total):
        seen.append(stage)
        if stage == "calibrate":
            ev.set()  # the user presses Cancel during calibration

    r = H.calibrate(s, "pasted", pasted=LOREM * 40, num_samples=8, seq_len=64, progress=progress, cancel_event=ev)
    assert not r.ok and "Cancelled" in r.message and s.calibration is None
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())
    assert all(p.grad is None for p in s.model.parameters())
    # and a propagate prune cancelled half way leaves no pruned model and the dense one intact
    assert H.calibrate(s, "pasted", pasted=LOREM * 40, num_samples=8, seq_len=64).ok
    ev2 = threading.Event()
    r = H.prune(s, 0.3, mode="propagate", progress=lambda st, d, t: ev2.set() if st == "propagate" else None,
                cancel_event=ev2)
    assert not r.ok and "Cancelled" in r.message and s.pruned is None
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())
    assert H.cancel(s).ok


# --- inspect, measure, compare, export ----------------------------------------------------------

def test_figures_from_a_plan(calibrated):
    from stat_app import figures as F

    r = H.prune(calibrated, 0.3)
    plan = r["plan"]
    heat = F.head_heatmap(plan)
    assert heat.data[0].type == "heatmap" and len(heat.data[0].z) == 2 and len(heat.data[0].z[0]) == 4
    kept = {(lp.layer, h) for lp in plan.layers for h in lp.kept_heads}
    for (layer, h), v in ((lh, heat.data[0].z[lh[0]][lh[1]]) for lh in [(0, 0), (0, 1), (1, 2), (1, 3)]):
        assert (v > 0) == ((layer, h) in kept)
    assert "importance rank" in heat.data[0].hovertext[0][0]
    why = H.plan_explanations(calibrated)
    neurons = F.neuron_profile(plan, why["importance"], why["massive"])
    assert [t.type for t in neurons.data][0] == "heatmap" and neurons.data[-1].type == "bar"
    assert neurons.data[-1].x[0] == pytest.approx(len(plan.layers[0].kept_neurons) / 64)
    # binned by importance, not index: the most important bin of each layer is its best-kept one here
    z = neurons.data[0].z
    for lp, energy in zip(plan.layers, why["importance"]):
        top = set(torch.argsort(energy, descending=True)[:len(energy) // 40 or 1].tolist())
        assert z[lp.layer][0] == pytest.approx(len(top & set(lp.kept_neurons)) / len(top))
    # singular values: computed at calibration, the plan's cuts marked, one layer and all layers
    assert "spectra" in calibrated.calibration.timings
    spectra = why["spectra"]
    assert [(sp["attn"].kept, sp["mlp"].kept) for sp in spectra] == \
        [(len(lp.kept_heads), len(lp.kept_neurons)) for lp in plan.layers]
    one_layer = F.spectrum_figure(spectra, 1)
    lines = [t for t in one_layer.data if t.mode == "lines"]
    assert len(lines) == 6 and one_layer.layout.title.text.startswith("Layer 1")
    all_layers = F.spectrum_figure(spectra, None)
    assert [t.type for t in all_layers.data] == ["bar"] * 4
    mlp_id = all_layers.data[2]
    assert list(mlp_id.y) == [sp["mlp"].id_residual[sp["mlp"].kept] for sp in spectra]
    one = F.decay_curves(plan, 1)
    assert one.layout.yaxis.type == "log"
    assert list(one.data[0].x) == list(range(65))   # k = 0..d_ff
    assert one.data[1].x[0] == len(plan.layers[1].kept_neurons)  # chosen cut marked
    both = F.decay_curves(plan, None)
    assert len([t for t in both.data if t.mode == "lines"]) == 2
    assert F.empty_figure().layout.annotations


def test_measure_generate_compare(calibrated):
    s = calibrated
    assert H.prune(s, 0.3).ok
    m = H.measure(s, eval_tokens=256)
    assert m.ok, m.message
    names = [row[0] for row in m["rows"]]
    assert names[0].startswith("perplexity (quick") and any("latency" in n for n in names)
    assert m["after"]["params"] < m["before"]["params"] and m["after"]["bytes"] < m["before"]["bytes"]
    assert s.report["perplexity_before"] > 1
    g = H.generate(s, "The river", max_new_tokens=5)
    assert g.ok and isinstance(g["before"], str) and isinstance(g["after"], str)
    assert one_sentence(H.generate(s, "  "))
    c = H.compare(s, 0.3, eval_tokens=256)
    assert c.ok, c.message
    assert [r["method"] for r in c["results"]] == list(H.COMPARE_METHODS)
    # the same budget, met by each method to within about one neuron per layer
    assert all(abs(r["achieved"] - 0.3) < 0.03 for r in c["results"]), [r["achieved"] for r in c["results"]]
    from stat_app.figures import compare_figure

    fig = compare_figure(c["results"], c["dense"], c["metric"])
    assert len(fig.data[0].x) == len(H.COMPARE_METHODS)


def test_compare_with_the_evaluation_suite(calibrated):
    """Compare's suite columns are the suite of each method's own pruned copy, against one dense
    reference built once per model and kept; KL is the quick windows' KL of that copy."""
    from stat_core.evaluation import measure as M
    from stat_core import pipeline as P
    from stat_core.methods.registry import get_method
    from stat_core.evaluation.suite import SuiteConfig, evaluate_suite

    s = calibrated
    tiny = SuiteConfig.tiny()
    stages = []
    c = H.compare(s, 0.3, eval_tokens=256, methods=("stat", "magnitude"), suite=True, suite_config=tiny,
                  progress=lambda stage, done, total: stages.append(stage))
    assert c.ok, c.message
    assert {"dense windows", "dense few-shot", "compare"} <= set(stages)
    ref = s.suite_reference
    assert ref is not None and c["suite_dense"] == ref.dense_metrics
    assert c["headers"][:5] == ["method", "removed", "quick perplexity (256 tokens)", "vs dense", "KL to dense"]
    assert c["headers"][5:] == [h for _, h, _ in M.SUITE_COLUMNS]
    assert c["rows"][0][0] == "dense" and c["rows"][0][4] == "0"
    assert [row[0] for row in c["rows"][1:]] == [H.method_label("stat"), H.method_label("magnitude")]
    base = M.baseline(s.model, s.tokenizer, None, 256)
    for r in c["results"]:
        config = P.prune_config(s.model, s.calib_data, 0.3, method=r["method"])
        pruned, _ = P.prune_copy(s.model, s.calibration, s.calib_data, config, s.model_name)
        assert r["suite"] == evaluate_suite(pruned, s.tokenizer, ref)
        ppl, kl = M.perplexity_and_kl(pruned, base.windows, s.model)
        assert r["perplexity"] == pytest.approx(ppl, rel=1e-6) and r["kl_to_dense"] == pytest.approx(kl, rel=1e-6)
        assert r["kl_to_dense"] > 0
    # the best method per column is named (perplexity: the lower of the two)
    best = min(c["results"], key=lambda r: r["perplexity"])["method"]
    assert f"perplexity {get_method(best).label}" in c.message
    # the reference is kept: a second comparison does not rebuild it
    again = H.compare(s, 0.2, eval_tokens=256, methods=("stat",), suite=True, suite_config=tiny)
    assert again.ok and s.suite_reference is ref
    # without the suite: the quick columns only
    plain = H.compare(s, 0.3, eval_tokens=256, methods=("stat",))
    assert plain.ok and len(plain["headers"]) == 5 and "suite" not in plain["results"][0]


def test_classifier_session(classifier_dir):
    s = Session()
    r = H.load(s, "folder", str(classifier_dir))
    assert r.ok and r["arch"]["kind"] == "classifier"
    assert "labelled" in one_sentence(H.calibrate(s, "pasted", pasted=LOREM * 20, seq_len=64))
    r = H.calibrate(s, "builtin", builtin="movie-reviews", num_samples=40, seq_len=64)
    assert r.ok, r.message
    p = H.prune(s, 0.3)
    assert p.ok, p.message
    m = H.measure(s)
    assert m.ok and m["rows"][0][0].startswith("held-out accuracy")
    from stat_core.evaluation.classifier import accuracy
    # the table's number is the pruned copy's accuracy on the held-out half, recomputed here
    assert m["after"]["accuracy"] == accuracy(s.pruned, s.held_out)
    assert m["before"]["accuracy"] == accuracy(s.model, s.held_out)
    assert m["rows"][0][2] == f"{m['after']['accuracy']:.1%}"
    assert one_sentence(H.generate(s, "hello"))
    assert "decoders" in one_sentence(H.compare(s, 0.3, methods=("stat",), suite=True))
    assert s.suite_reference is None
    # a format that does not apply to a classifier: one sentence naming the ones that do, nothing written
    msg = one_sentence(H.export(s, "GGUF float16 (llama.cpp)"))
    assert "gguf" in msg and "safetensors" in msg
    assert not list(s.workdir.glob("*.zip"))


def test_export_gguf_and_onnx_downloads(calibrated):
    """The app's other formats: a zip with the .gguf file (read back with the gguf reader: per-layer
    head counts) or the .onnx file, each with its report."""
    from gguf import GGUFReader

    s = calibrated
    assert H.prune(s, 0.3).ok
    r = H.export(s, "GGUF float16 (llama.cpp)")
    assert r.ok, r.message
    with zipfile.ZipFile(r["zip"]) as zf, tempfile.TemporaryDirectory() as tmp:
        ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
        assert len(ggufs) == 1
        reader = GGUFReader(zf.extract(ggufs[0], tmp))
        heads = [int(v) for v in reader.fields[next(k for k in reader.fields if k.endswith(".attention.head_count"))]
                 .contents()]
        assert heads == [len(lp.kept_heads) for lp in s.plan.layers]
    r = H.export(s, "ONNX (onnxruntime)")
    assert r.ok, r.message
    with zipfile.ZipFile(r["zip"]) as zf:
        assert any(n.endswith(".onnx") for n in zf.namelist())


def test_export_zip(calibrated):
    s = calibrated
    assert H.prune(s, 0.3).ok
    r = H.export(s)
    assert r.ok, r.message
    r2 = H.export(s)  # a second export replaces the first zip on disk
    assert r2.ok and r2["zip"] != r["zip"] and not Path(r["zip"]).exists() and Path(r2["zip"]).exists()
    r = r2
    with zipfile.ZipFile(r["zip"]) as zf:
        names = zf.namelist()
    assert any(n.endswith("/config.json") for n in names) and any(n.endswith("model.safetensors") for n in names)
    assert json.loads(open(r["report"]).read())["model"] == s.model_name


def test_sessions_are_isolated_and_cleaned_up(decoder_dir):
    store = SessionStore(max_sessions=2, grace_seconds=0)
    a, b = store.get("a"), store.get("b")
    assert a is not b and store.get("a") is a
    assert H.load(a, "folder", str(decoder_dir)).ok
    assert b.model is None
    work = a.workdir
    assert work.exists()
    store.drop("a")
    assert a.model is None and not work.exists() and "a" not in store
    store.get("c"), store.get("d")  # LRU eviction beyond max_sessions
    assert len(store) == 2 and "b" not in store


def test_rebudget_during_surgery_cannot_pair_a_plan_with_another_plans_weights(calibrated, monkeypatch):
    """The race of slider re-budget (no device lock) lands while Export builds the
    pruned copy of the previous plan. Reproduced deterministically: surgery blocks on an event
    until the re-budget has been installed. The export must ship one prune's plan and weights, and
    the session must never hold the new plan with the old weights."""
    import threading

    from safetensors import safe_open

    s = calibrated
    assert H.replan(s, 0.25).ok
    plan_a = s.plan
    in_surgery, rebudgeted = threading.Event(), threading.Event()
    real_apply = H.pipeline.apply_plan_

    def slow_apply(model, plan, *args, **kwargs):
        out = real_apply(model, plan, *args, **kwargs)
        in_surgery.set()
        assert rebudgeted.wait(30), "the re-budget never ran"
        return out

    monkeypatch.setattr(H.pipeline, "apply_plan_", slow_apply)
    replies = {}
    worker = threading.Thread(target=lambda: replies.setdefault("export", H.export(s)))
    worker.start()
    assert in_surgery.wait(60), "export never reached surgery"
    r = H.replan(s, 0.6)             # lands mid-surgery, as the slider does
    rebudgeted.set()
    worker.join(60)
    monkeypatch.setattr(H.pipeline, "apply_plan_", real_apply)
    assert r.ok and s.plan is r["plan"] and s.plan is not plan_a
    exported = replies["export"]
    assert exported.ok, exported.message

    # the session: the new plan with no model yet (never the old model), built for the new plan on demand
    assert s.pruned is None
    built = H.ensure_pruned(s).pruned
    assert [m.mlp.down_proj.in_features for m in built.model.layers] == [len(lp.kept_neurons) for lp in s.plan.layers]

    # the zip: plan.json, the report and the weights all describe plan A
    with zipfile.ZipFile(exported["zip"]) as zf:
        folder = Path(s.workdir) / "unzipped"
        zf.extractall(folder)
    root = next(folder.iterdir())
    plan_json = json.loads((root / "plan.json").read_text())
    assert [len(lp["kept_neurons"]) for lp in plan_json["layers"]] == [len(lp.kept_neurons) for lp in plan_a.layers]
    with safe_open(str(root / "model.safetensors"), "pt") as f:
        widths = [f.get_slice(f"model.layers.{i}.mlp.down_proj.weight").get_shape()[1]
                  for i in range(len(plan_a.layers))]
    assert widths == [len(lp.kept_neurons) for lp in plan_a.layers]
    assert widths != [len(lp.kept_neurons) for lp in s.plan.layers]   # the two budgets really differ
    report = json.loads((root / "pruning_report.json").read_text())
    assert report["sparsity_target"] == 0.25
    shutil.rmtree(folder)


def test_head_explorer(calibrated):
    s = calibrated
    assert H.prune(s, 0.5).ok
    plan = s.plan
    removed = [(lp.layer, h) for lp in plan.layers for h in range(lp.num_heads) if h not in lp.kept_heads]
    kept = [(lp.layer, h) for lp in plan.layers for h in lp.kept_heads]
    assert removed and kept, "the test needs a removed and a kept head"
    r = H.head_view(s, *removed[0], LOREM[:120])
    assert r.ok, r.message
    assert "removed" in r.message and "reconstruct" in r.message
    share = r["details"]["reconstructed_share"]
    assert f"{share:.0%}" in r.message
    w = torch.tensor(r["pattern"]["weights"])
    assert w.shape[0] == w.shape[1] == len(r["pattern"]["tokens"]) > 5
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))
    k = H.head_view(s, *kept[0], "Short text here.")
    assert k.ok and "; kept." in k.message and k["details"]["reconstructed_share"] is None
    # The induction score shown is the dense model's, from the same measurement STAT's protection uses.
    from stat_core.methods.stat.induction import induction_scores

    layer, head = kept[0]
    score = induction_scores(s.model)[layer][head]
    assert k["details"]["induction_score"] == pytest.approx(score)
    assert f"Induction score {score:.2f}" in k.message
    assert "layers 0–1" in one_sentence(H.head_view(s, 7, 0, "text"))
    assert "does not exist" in one_sentence(H.head_view(s, 0, 99, "text"))
    assert "sample text" in one_sentence(H.head_view(s, 0, 0, "   "))
    assert "by number" in one_sentence(H.head_view(s, "x", 0, "text"))
    assert "Load a model" in one_sentence(H.head_view(Session(), 0, 0, "text"))


def test_cli_and_app_exports_carry_the_same_report_fields(calibrated, decoder_dir, tmp_path):
    """One pipeline: the same model, calibration text and budget through the app and through the CLI
    give reports with the same fields (sizes before and after included) and the same numbers."""
    from stat_core.cli import main as cli_main

    s = calibrated
    assert H.prune(s, 0.3).ok
    r = H.export(s)
    assert r.ok, r.message
    app_report = json.loads(open(r["report"]).read())
    text = tmp_path / "lorem.txt"
    text.write_text("\n\n".join([LOREM * 40]))
    out = tmp_path / "cli-out"
    assert cli_main([str(decoder_dir), "--sparsity", "0.3", "--calibration", str(text), "--num-samples", "8",
                     "--seq-len", "64", "--skip-eval", "--quiet", "--out", str(out)]) == 0
    cli_report = json.loads((out / "pruning_report.json").read_text())
    shared = {"model", "kind", "method", "mode", "budget_kind", "sparsity_target", "uniform", "flops_seq_len",
              "device", "dtype", "calibration_tokens", "calibration", "params_before", "params_after",
              "block_params_before", "block_params_after", "block_macs_per_token_before",
              "block_macs_per_token_after", "size_on_disk_before_bytes", "size_on_disk_after_bytes",
              "block_params_removed_fraction", "block_flops_removed_fraction", "predicted_damage", "layers"}
    assert shared <= set(app_report) and shared <= set(cli_report)
    for key in ("params_before", "block_params_before", "size_on_disk_before_bytes", "calibration_tokens"):
        assert app_report[key] == cli_report[key], key
    # The written weights' size replaced the planned one in both.
    assert app_report["size_on_disk_after_bytes"] < app_report["size_on_disk_before_bytes"]
    assert cli_report["size_on_disk_after_bytes"] < cli_report["size_on_disk_before_bytes"]


def test_cancel_during_export_leaves_nothing_half_written(calibrated, monkeypatch):
    """Cancel while the folder is written (before zipping): no folder, no partial zip, and the
    previous export's zip is still there."""
    import threading

    from stat_core.export import api as core_export  # export_model calls export_pruned from here

    s = calibrated
    assert H.prune(s, 0.3).ok
    first = H.export(s)
    assert first.ok
    event = threading.Event()
    real = core_export.export_pruned

    def export_then_cancel(*args, **kwargs):
        info = real(*args, **kwargs)
        event.set()  # the user presses Cancel while the folder is being written
        return info

    monkeypatch.setattr(core_export, "export_pruned", export_then_cancel)
    r = H.export(s, cancel_event=event)
    assert not r.ok and "Cancelled" in r.message
    left = sorted(p.name for p in s.workdir.iterdir())
    assert [n for n in left if n.endswith(".zip")] == [Path(first["zip"]).name]
    assert not any(n.endswith(".part") or (s.workdir / n).is_dir() for n in left), left


# --- recovery after pruning (the app's checkbox, the CLI's --recover) -------------------

def _kl_on_calibration(s, model):
    from stat_core.evaluation.measure import perplexity_and_kl

    return perplexity_and_kl(model, s.calib_data, dense=s.model)[1]


def test_prune_with_recovery_lowers_kl_and_cancel_keeps_the_pruned_copy(calibrated):
    import threading

    s = calibrated
    dense_state = {k: v.clone() for k, v in s.model.state_dict().items()}
    plain = H.prune(s, 0.5)
    assert plain.ok and "recover" not in plain["report"]
    plain_state = {k: v.clone() for k, v in s.pruned.state_dict().items()}
    kl_plain = _kl_on_calibration(s, s.pruned)

    seen = []
    r = H.prune(s, 0.5, recover_steps=25, progress=lambda *a: seen.append(a))
    assert r.ok, r.message
    assert "Recovered for 25 steps" in r.message and ("recover", 25, 25) in seen
    assert r["report"]["recover"]["steps"] == 25 and r["report"]["seconds_recover"] > 0
    assert r["plan"].kept_summary() == plain["plan"].kept_summary()          # the same prune, then recovery
    recovered = s.pruned.state_dict()
    assert {k: v.shape for k, v in recovered.items()} == {k: v.shape for k, v in plain_state.items()}
    assert any(not torch.equal(recovered[k], plain_state[k]) for k in plain_state)
    assert _kl_on_calibration(s, s.pruned) < kl_plain                         # closer to the dense model
    assert all(torch.equal(v, dense_state[k]) for k, v in s.model.state_dict().items())   # dense untouched
    assert all(p.grad is None for p in s.pruned.parameters())

    # Cancel during recovery: the prune is kept, exactly as it was before recovery, and says so
    ev = threading.Event()
    c = H.prune(s, 0.5, recover_steps=40, cancel_event=ev,
                progress=lambda st, d, t: ev.set() if st == "recover" and d == 3 else None)
    assert not c.ok and "recovery cancelled" in c.message and "\n" not in c.message
    assert s.plan is c["plan"] and "recover" not in s.report
    assert all(torch.equal(v, plain_state[k]) for k, v in s.pruned.state_dict().items())
    assert all(torch.equal(v, dense_state[k]) for k, v in s.model.state_dict().items())

    # bad step counts: one sentence, before any calibration
    fresh = Session(model=s.model, tokenizer=s.tokenizer, model_name=s.model_name)
    for bad in (-5, 2.5, "many"):
        msg = one_sentence(H.calibrate_and_prune(fresh, {"source": "pasted", "pasted": LOREM * 20},
                                                 {"sparsity": 0.3, "recover_steps": bad}))
        assert "Recovery steps must be a whole number" in msg and fresh.calibration is None


def test_recovery_for_a_classifier_and_the_same_report_as_the_cli(classifier_dir, calibrated, decoder_dir, tmp_path):
    """Encoders recover too; the CLI's --recover and the app's checkbox write the same report keys
    (one function, stat_core.pipeline.recover)."""
    from stat_core.cli import main as cli_main

    c = Session()
    assert H.load(c, "folder", str(classifier_dir)).ok
    assert H.calibrate(c, "builtin", builtin="movie-reviews", num_samples=40, seq_len=64).ok
    plain = H.prune(c, 0.3)
    shapes = {k: v.shape for k, v in c.pruned.state_dict().items()}
    r = H.prune(c, 0.3, recover_steps=4)
    assert r.ok and r["report"]["recover"]["steps"] == 4 and r["report"]["recover"]["batch_size"] == 16, r.message
    assert r["plan"].kept_summary() == plain["plan"].kept_summary()
    assert {k: v.shape for k, v in c.pruned.state_dict().items()} == shapes
    c.close()

    s = calibrated
    app = H.prune(s, 0.3, recover_steps=3)
    assert app.ok, app.message
    text = tmp_path / "lorem.txt"
    text.write_text(LOREM * 40)
    out = tmp_path / "cli-recover"
    assert cli_main([str(decoder_dir), "--sparsity", "0.3", "--calibration", str(text), "--num-samples", "8",
                     "--seq-len", "64", "--skip-eval", "--quiet", "--no-model", "--recover", "3",
                     "--out", str(out)]) == 0
    cli_report = json.loads((out / "pruning_report.json").read_text())
    assert set(cli_report["recover"]) == set(app["report"]["recover"])
    assert cli_report["recover"]["steps"] == app["report"]["recover"]["steps"] == 3
    assert cli_report["seconds_recover"] > 0 and app["report"]["seconds_recover"] > 0


def test_tab_statuses_follow_the_plan(calibrated):
    fresh = H.tab_statuses(None)
    assert fresh[0] == "Prune a model, then inspect what went and why."
    s = calibrated
    assert H.replan(s, 0.35).ok
    inspect, learn, compare, export = H.tab_statuses(s)
    for line in (inspect, learn, compare, export):
        assert line.startswith("Showing the plan that removes 35") and "(stat, one-shot)" in line, line
    assert "heads heatmap" in inspect and "Explain" in learn and "compare methods" in compare and "Export" in export


def test_corrections_fitted_on_another_text_with_the_models_own_fisher(decoder_dir):
    """The calibration section's 'sensitivity labels' and 'fit corrections on': the plan is the one the
    text itself chooses with those labels, the cut copy carries the other text's corrections (the
    library's stat_prune_ with correction_windows gives the same weights), re-budgets keep them, and
    propagate mode is refused in one sentence."""
    from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
    from stat_core.pipeline import stat_prune_

    s = Session(key="correct-on")
    try:
        assert H.load(s, "folder", str(decoder_dir)).ok
        calib = dict(source="pasted", pasted=LOREM * 40, num_samples=8, seq_len=64, sensitivity_labels="model")
        r = H.calibrate(s, **calib, correct_on="wikipedia")
        assert r.ok and r.message.endswith("; corrections are fitted on wikipedia."), r.message
        assert s.calib_info["corrections_fitted_on"]["source"] == "wikipedia"
        assert "corrections" in one_sentence(H.calibrate_and_prune(
            s, {**calib, "correct_on": "wikipedia"}, dict(sparsity=0.3, mode="propagate")))
        assert "Propagate" in one_sentence(H.prune(s, 0.3, mode="propagate"))
        assert H.prune(s, 0.3).ok
        pruned = s.outcome.pruned
        text, wiki = s.calib_data, calibration_windows(s.tokenizer, wikipedia_split("calibration"),
                                                       CalibrationConfig(num_samples=8, seq_len=64, seed=0))
        model, _ = H.load_model(str(decoder_dir))
        config = H.make_config(s, 0.3)
        result = stat_prune_(model, text, dataclasses.replace(config, sensitivity_labels="model"),
                             correction_windows=wiki)
        assert [lp.kept_neurons for lp in result.plan.layers] == [lp.kept_neurons for lp in s.plan.layers]
        for a, b in zip(model.state_dict().values(), pruned.state_dict().values()):
            torch.testing.assert_close(a, b)
        assert H.replan(s, 0.2).ok and H.cut_copy(s).ok
        assert "not 'nowhere'" in one_sentence(H.calibrate(s, **calib, correct_on="nowhere"))
    finally:
        s.close()
