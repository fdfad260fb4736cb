"""The Learn view, the HTML report, the head "why", the time estimate and the page's bad-value
guards, as plain functions on a tiny random Llama (2 layers, 4 heads on 2 KV heads)."""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stat_app import figures as F
from stat_app import handlers as H
from stat_app.sessions import Session, SessionStore

from conftest import save_tiny_llama_with_demo_tokenizer

LOREM = ("The history of the river valley begins with small farming villages along the banks. Over the "
         "centuries trade routes crossed the region and towns grew around markets, bridges and mills. ")


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return save_tiny_llama_with_demo_tokenizer(tmp_path_factory.mktemp("tiny-llama-learn"))


@pytest.fixture(scope="module")
def pruned(decoder_dir):
    s = Session(key="learn")
    assert H.load(s, "folder", str(decoder_dir)).ok
    r = H.calibrate_and_prune(s, dict(source="pasted", pasted=LOREM * 40, num_samples=8, seq_len=64),
                              dict(sparsity=0.5))
    assert r.ok, r.message
    yield s
    s.close()


def numbers_in(text: str) -> list[str]:
    return re.findall(r"\d[\d,.]*", text)


def test_lesson_steps_are_computed_from_the_model(pruned):
    r = H.lesson(pruned, 1, "The history of the city", 8)
    assert r.ok, r.message
    plan = pruned.plan
    lp = plan.layers[1]
    act = r["activations"]
    z = np.asarray(act["values"])
    assert z.shape[1] == len(act["neurons"]) == lp.intermediate_size   # 64 neurons: all shown
    assert act["kept"] == [j in lp.kept_neurons for j in act["neurons"]]
    spec = r["spectrum"]
    assert spec["n"] == lp.intermediate_size and spec["k90"] <= spec["k99"] <= spec["n"]
    assert f"{spec['k90']:,} of {spec['n']:,} directions hold 90%" in " ".join(spec["sentences"])
    sel = r["selection"]
    assert sel["kept"] == len(lp.kept_neurons)
    assert all(i >= s - 1e-9 for i, s in zip(sel["id_residual"], sel["svd_residual"]))   # the SVD is a floor
    assert f"Keeping {sel['kept']:,} of {sel['n']:,} neurons" in " ".join(sel["sentences"])
    corr = r["correction"]
    assert corr["removed"] == lp.intermediate_size - len(lp.kept_neurons) and corr["tokens"] > 0
    assert 0 < corr["error_without"] and 0 <= corr["error_with"]
    alloc = r["allocation"]
    assert alloc["kept_neurons"][1] == pytest.approx(len(lp.kept_neurons) / lp.intermediate_size)
    eff = r["effect"]
    assert len(eff["tokens"]) == len(eff["kl"]) == 8 and all(k >= 0 for k in eff["kl"])
    # every step's text carries its own numbers, two or three sentences each
    for key in H.LESSON_STEPS:
        text = F.lesson_text(1, r[key])
        assert numbers_in(text) and 2 <= text.count(". ") + 1 <= 4, (key, text)
    # the figures build
    for fig in (F.lesson_activations(act, 1), F.lesson_spectrum(spec, 1), F.lesson_selection(sel, 1),
                F.lesson_correction(corr, 1), F.lesson_allocation(alloc, 1)):
        assert fig.data
    html = F.lesson_effect_html(eff)
    assert html.count("title='KL") == 8


def test_lesson_correction_matches_an_explicit_least_squares_fit(pruned):
    """The corrected error equals the error of fitting the removed activations from the kept ones
    by least squares on the calibration Gram (the fold W_K + W_R Tᵀ), computed here by hand."""
    from stat_core.adapters import get_adapter
    from stat_core.methods.stat import lesson as L

    model, plan = pruned.model, pruned.plan
    gen = torch.Generator().manual_seed(3)
    held = torch.randint(0, 49152, (2, 32), generator=gen)
    step = L.correction_step(model, pruned.calibration, plan, 0, held, n_tokens=32)
    z = L.mlp_activations(model, held, None, 0)
    w = get_adapter(model).mlp_out_proj(0).weight.detach().double()
    lp = plan.layers[0]
    k = sorted(lp.kept_neurons)
    r = sorted(set(range(lp.intermediate_size)) - set(k))
    g = pruned.calibration.dense_stats[0].mlp_gram.double()
    t = torch.linalg.lstsq(g[k][:, k], g[k][:, r]).solution
    y = z @ w.T
    y_corr = z[:, k] @ (w[:, k] + w[:, r] @ t.T).T
    y_plain = z[:, k] @ w[:, k].T
    assert step["error_without"] == pytest.approx(float(((y - y_plain) ** 2).sum() / (y ** 2).sum()), rel=1e-6)
    assert step["error_with"] == pytest.approx(float(((y - y_corr) ** 2).sum() / (y ** 2).sum()), rel=1e-3)


def test_lesson_bad_layer_and_before_a_prune(pruned):
    msg = H.lesson(pruned, 9, "x").message
    assert not H.lesson(pruned, 9, "x").ok and msg == "The model has layers 0–1; pick one of those."
    assert "Load a model" in H.lesson(Session(), 0, "x").message


def test_head_reasons_and_what_the_caption_says_about_kv_groups(pruned):
    """What the heatmap caption claims holds: each kept KV group keeps the same number of query
    heads, a removed group keeps none; the hover's reconstructed share equals the head explorer's."""
    from stat_core.methods.stat import explain

    plan = pruned.plan
    reasons = H.head_reasons(pruned)
    for lp, rows in zip(plan.layers, reasons):
        group = lp.num_heads // lp.num_kv_heads
        per_group = {g: sum(1 for h in lp.kept_heads if h // group == g) for g in range(lp.num_kv_heads)}
        assert {per_group[g] for g in lp.kept_kv_heads} == {len(lp.kept_heads) // len(lp.kept_kv_heads)}
        assert all(per_group[g] == 0 for g in set(range(lp.num_kv_heads)) - set(lp.kept_kv_heads))
        assert sum(r["energy_share"] for r in rows) == pytest.approx(1.0)
        for h, row in enumerate(rows):
            if h in lp.kept_heads:
                assert row["reconstructed_share"] is None
            else:
                d = explain.head_details(pruned.model, pruned.calibration, plan, lp.layer, h)
                assert row["reconstructed_share"] == pytest.approx(d["reconstructed_share"], abs=1e-6)
                assert d["why"].startswith("Removed") and f"{row['energy_share']:.0%}" in d["why"]
    assert "a KV group is removed only with all its heads" in F.HEADS_CAPTION
    fig = F.head_heatmap(plan, reasons)
    hover = " ".join(" ".join(row) for row in fig.data[0].hovertext)
    assert "Removed" in hover and "Kept" in hover and "reproduce" in hover


def test_figures_a_learner_can_read(pruned):
    why = H.plan_explanations(pruned)
    decay = F.decay_curves(pruned.plan, None)
    bars = [t for t in decay.data if getattr(t.marker, "showscale", None)]
    assert len(bars) == 1 and bars[0].marker.colorbar.title.text == "layer"       # a colour scale, not a palette
    assert "log scale" in decay.layout.yaxis.title.text
    colors = {t.line.color for t in decay.data if t.mode == "lines"}
    assert len(colors) == len(pruned.plan.layers)
    neurons = F.neuron_profile(pruned.plan, why["importance"], why["massive"])
    heat = neurons.data[0]
    assert heat.showscale and heat.colorbar.title.text == "kept"
    assert list(neurons.layout.xaxis.ticktext)[:2] == ["0%", "10%"]
    pattern = {"tokens": ["a", "b", "c"], "weights": [[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]}
    assert F.attention_figure(pattern).layout.height >= 600


def test_html_report_is_self_contained(pruned):
    assert H.measure(pruned, 512).ok
    r = H.report_html(pruned)
    assert r.ok, r.message
    text = Path(r["path"]).read_text()
    assert "MiB" in r.message
    assert text.count("Plotly.newPlot") >= 4          # heads, neurons, decay, singular values
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", text)   # nothing fetched: plotly.js is inline
    assert "perplexity (quick: 512 eval tokens)" in text                              # the measured table
    assert "<h2>The plan, layer by layer</h2>" in text and "block parameters removed" in text
    assert re.search(r"block FLOPs / token \(MACs\)</td><td>[\d,]+ → [\d,]+</td>", text)   # integers, no .0


def test_cli_writes_the_html_report(decoder_dir, tmp_path):
    from stat_core.cli import main

    out = tmp_path / "report.html"
    rc = main([str(decoder_dir), "--sparsity", "0.3", "--out", str(tmp_path / "m"), "--num-samples", "4",
               "--seq-len", "64", "--skip-eval", "--no-model", "--quiet", "--report-html", str(out)])
    assert rc == 0
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in text and not re.search(r"<script[^>]+src=", text)
    # a folder that does not exist: one sentence before any work
    assert main([str(decoder_dir), "--sparsity", "0.3", "--out", str(tmp_path / "m2"), "--no-model", "--quiet",
                 "--report-html", str(tmp_path / "nope" / "r.html")]) == 2
    assert not (tmp_path / "m2").exists()
    # the same path again replaces the earlier report (this tool wrote it)
    assert main([str(decoder_dir), "--sparsity", "0.2", "--out", str(tmp_path / "m3"), "--num-samples", "4",
                 "--seq-len", "64", "--skip-eval", "--no-model", "--quiet", "--report-html", str(out)]) == 0
    assert out.read_text() != text


def test_the_report_never_replaces_someone_elses_file(decoder_dir, tmp_path, capsys):
    """--report-html onto the source weights, onto any file this tool did not write, into the model's
    folder or a read-only place: one sentence before any work, every file byte for byte as it was."""
    import hashlib

    from stat_core.cli import main

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

    page = tmp_path / "index.html"
    page.write_text("<html>my page</html>")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    before_model, before_page = digest(decoder_dir), page.read_bytes()
    import subprocess
    import shutil

    frozen = shutil.which("chattr") and subprocess.run(["chattr", "+i", str(readonly)]).returncode == 0
    rows = [(decoder_dir / "model.safetensors", "is inside"), (decoder_dir / "new.html", "is inside"),
            (page, "exists and is not a report this tool wrote")]
    if frozen:
        rows.append((readonly / "r.html", "Cannot write the report in"))
    try:
        for path, fragment in rows:
            capsys.readouterr()
            assert main([str(decoder_dir), "--sparsity", "0.3", "--out", str(tmp_path / "m"), "--num-samples", "4",
                         "--seq-len", "64", "--skip-eval", "--quiet", "--report-html", str(path)]) == 2
            err = capsys.readouterr().err
            assert fragment in err and "Traceback" not in err, err[-400:]
            assert not (tmp_path / "m").exists()
    finally:
        if frozen:
            subprocess.run(["chattr", "-i", str(readonly)])
    assert digest(decoder_dir) == before_model and page.read_bytes() == before_page


def test_time_estimate_grows_with_the_work(pruned):
    from stat_core.estimate import calibration_seconds, estimate_sentence

    small = calibration_seconds(pruned.model, 8, 64, threads=2)
    big = calibration_seconds(pruned.model, 64, 512, threads=2)
    assert 0 < small["seconds"] < big["seconds"] and big["tokens"] == 64 * 512
    assert calibration_seconds(pruned.model, 64, 512, threads=4)["seconds"] < big["seconds"]
    text = estimate_sentence(pruned.model, 64, 512)
    assert text.startswith("First calibration: about") and "32,768 tokens" in text
    assert estimate_sentence(pruned.model, 0, 512) == ""


def test_the_page_refuses_a_fraction_and_a_zero_sample_count(decoder_dir):
    """Typing 0.99 into the percent slider is refused in one sentence and the slider goes back to
    the plan's value; 0 samples answers one sentence (no component errors: the boxes have no
    minimum for Gradio to enforce)."""
    from stat_app.app import build_demo

    store = SessionStore(max_sessions=2)
    demo = build_demo(store)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    req = SimpleNamespace(session_hash="u")
    assert fns["on_load"]("folder", "", str(decoder_dir), "cpu", req)[0].startswith("✓ Loaded")
    out = fns["on_prune"]("pasted", "wikipedia", None, LOREM * 40, 0, 64, 30, "params", False, "one-shot", "stat",
                          "all layers", False, 100, "", request=req)
    assert out[0] == "⚠ The number of calibration samples must be at least 1, got 0.", out[0]
    out = fns["on_prune"]("pasted", "wikipedia", None, LOREM * 40, 8, 64, 30, "params", False, "one-shot", "stat",
                          "all layers", False, 100, "", request=req)
    assert out[0].startswith("✓ Removed"), out[0]
    # the page shows the plan first and cuts the pruned copy right after (its status line says so)
    assert store.find("u").pruned is None
    assert fns["on_cut"](out[0], req).startswith(out[0] + " The pruned copy is ready (cut in ")
    assert store.find("u").pruned is not None
    out = fns["on_rebudget"](0.99, "params", False, "one-shot", "stat", "all layers", False, "", req)
    assert out[0] == "⚠ The slider counts percent: type 99 for 99% (0.99 would be under 1%).", out[0]
    assert out[-1]["value"] == 30                                   # back to the plan's 30%
    out = fns["on_rebudget"](1, "params", False, "one-shot", "stat", "all layers", False, "", req)
    assert out[0].startswith("✓ Planned to remove") and "1." in out[0]   # 1 means 1%, not 100%
    store.drop("u")


def test_model_tokens_never_become_html_in_the_learn_view():
    """The Learn view quotes generated tokens in Markdown: a token that is an image tag, a link or a
    script is shown as text (no tag, no link reaches the page)."""
    import html as _h

    hostile = "<img src='http://example.com/x.png'> [click](http://example.com) <script>alert(1)</script>"
    step = {"dense": hostile, "tokens": [hostile, "ok"], "kl": [0.5, 0.1],
            "sentences": [f"The worst token is '{hostile}'.", "Fine."]}
    text = F.lesson_text(6, step)
    assert "<img" not in text and "<script" not in text and "](" not in text.replace("&#93;(", "")
    assert "[click]" not in text and _h.unescape(text).count("<img") == 1  # shown, as text
    effect = F.lesson_effect_html(step)
    assert "<img" not in effect and "<script" not in effect


def test_attention_labels_are_inert():
    """Plotly draws links and line breaks in axis labels: tokens of the user's text are escaped."""
    fig = F.attention_figure({"tokens": ['<a href="http://example.com">x</a>', "<br>"], "weights": [[1, 0], [0.5, 0.5]]})
    assert all("<" not in label for label in fig.data[0].x)
