"""The served app in a real headless Chromium (Playwright driving Debian's /usr/bin/chromium).

Loads the demo model SmolLM2-135M with the defaults a first-time user keeps (the calibration
scripts/setup.sh stored is read), prunes 30%, checks that the heatmap and decay plots render,
downloads the export zip and takes screenshots: into a temporary folder, or into docs/screenshots/
with ``STAT_UPDATE_SCREENSHOTS=1`` (the normal test run leaves the tracked files alone). Another
test goes through the Learn view and the report button on a tiny model, and opens the report in
Chromium with the network blocked. Two users at once: one calibrates SmolLM2 on 4 × 256 tokens
(computed while the other re-budgets the demo classifier).
"""

import os
import tempfile

import re
import zipfile
from pathlib import Path

import pytest

from stat_app.browser import chromium, missing_chromium, serve, status_value, tab, wait_status

SCREENSHOTS = (Path(__file__).resolve().parent.parent / "docs" / "screenshots"
               if os.environ.get("STAT_UPDATE_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / "stat-screenshots")
CALIBRATION_TIMEOUT_MS = 540_000  # 4 × 256 tokens on SmolLM2 on 2 busy CPU cores: about a minute

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app, reading the calibrations scripts/setup.sh stored (the default windows of the demo
    decoder), as a user's app does, and writing what it calibrates into a temporary cache: a later run
    calibrates 4 × 256 tokens again (the two-session test needs one calibration still running)."""
    from stat_core.calibration import cache as calibration_cache

    root = tmp_path_factory.mktemp("calibration-cache")
    for entry in calibration_cache.cache_root().glob("*.safetensors"):
        (root / entry.name).symlink_to(entry)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STAT_CALIBRATION_CACHE", "on")
        mp.setenv("STAT_CALIBRATION_CACHE_DIR", str(root))
        with serve() as url:
            yield url


@pytest.fixture(scope="module")
def browser():
    if missing_chromium():
        pytest.fail(missing_chromium())
    with chromium() as b:
        yield b


def kept_heads(page) -> int:
    title = page.locator("#heads_plot .gtitle").first.text_content()
    return int(re.search(r"Attention heads: (\d+)/", title).group(1))


def pick_layer(page, layer: int):
    box = page.locator("#layer_pick input")
    box.click()
    box.fill(f"layer {layer}")
    page.locator("ul[role=listbox] li", has_text=f"layer {layer}").first.click()


def explain_views(page, name: str, layer: int, head: int):
    """The singular-value view (all layers, then one), the neuron profile and the head explorer
    render; screenshots for the README."""
    tab(page, "Inspect")
    spectrum = page.locator("#spectrum_plot .js-plotly-plot")
    spectrum.wait_for(timeout=30_000)
    assert page.locator("#spectrum_plot .barlayer .trace").count() == 4   # ID and SVD, attention and MLP
    spectrum.scroll_into_view_if_needed()
    page.locator("#spectrum_plot").screenshot(path=str(SCREENSHOTS / f"{name}-spectrum-all-layers.png"))
    pick_layer(page, layer)
    page.wait_for_function("l => { const t = document.querySelector('#spectrum_plot .gtitle');"
                           " return t && t.textContent.startsWith('Layer ' + l + ':'); }", arg=layer, timeout=60_000)
    assert page.locator("#spectrum_plot .scatterlayer .trace").count() >= 6   # σ, ID, SVD per block type
    page.locator("#spectrum_plot").screenshot(path=str(SCREENSHOTS / f"{name}-spectrum-layer.png"))
    page.locator("#neurons_plot").screenshot(path=str(SCREENSHOTS / f"{name}-neurons.png"))

    for elem, value in (("#head_layer", str(layer)), ("#head_index", str(head))):
        box = page.locator(f"{elem} input")
        box.fill(value)
        box.press("Tab")
    page.locator("#head_btn").click()
    wait_status(page, r"^✓ Attention pattern drawn", 120_000, "status_inspect")
    info = page.locator("#head_info").inner_text()
    assert f"Layer {layer}, head {head}" in info and "importance rank" in info, info
    assert ("kept." in info) != ("removed;" in info), info
    plot = page.locator("#head_plot .js-plotly-plot")
    plot.wait_for(timeout=30_000)
    assert page.locator("#head_plot .heatmaplayer").count() >= 1
    plot.scroll_into_view_if_needed()
    page.locator("#head_plot").screenshot(path=str(SCREENSHOTS / f"{name}-head-explorer.png"))


def test_load_calibrate_prune_inspect_export(app_url, browser, tmp_path):
    from stat_core.models import demo_model_dir

    if not (demo_model_dir("smollm2-135m") / "config.json").exists():
        pytest.fail("the demo model smollm2-135m is not in the cache; run scripts/setup.sh")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    try:
        page.goto(app_url, wait_until="domcontentloaded")  # "networkidle" never comes: the heartbeat stream stays open
        page.locator("#load_btn").wait_for(timeout=60_000)
        page.locator("#load_btn").click()
        wait_status(page, r"^✓ Loaded smollm2-135m", 120_000)
        assert "9 / 3" in page.locator("#arch").inner_text()  # heads / KV heads

        # The defaults a first-time user keeps: the calibration setup stored is read, not recomputed.
        page.locator("#prune_btn").click()
        text = wait_status(page, r"^✓ Removed", CALIBRATION_TIMEOUT_MS)
        removed = float(re.search(r"Removed (\d+\.\d)%", text).group(1))
        assert abs(removed - 30) < 1.0, text
        assert "Read the statistics of these 32,768 tokens from the calibration cache" in text, text
        page.screenshot(path=str(tmp_path / "app-prune.png"))  # not in the docs
        tab(page, "Inspect")
        # the tab's own status line says which plan it shows (not its message from before the prune)
        wait_status(page, r"^Showing the plan that removes 30\.\d% .*heads heatmap", 30_000, "status_inspect")

        heads = page.locator("#heads_plot .js-plotly-plot")
        heads.wait_for(timeout=30_000)
        assert page.locator("#heads_plot .heatmaplayer").count() >= 1
        kept_30 = kept_heads(page)
        assert 0 < kept_30 < 270
        assert page.locator("#neurons_plot .js-plotly-plot .heatmaplayer").count() >= 1
        decay = page.locator("#decay_plot .js-plotly-plot")
        decay.wait_for(timeout=30_000)
        assert page.locator("#decay_plot .scatterlayer .trace").count() >= 30  # one curve per layer (+ markers)
        page.screenshot(path=str(SCREENSHOTS / "app-overview.png"), full_page=True)
        page.locator("#heads_plot").screenshot(path=str(SCREENSHOTS / "heads-heatmap.png"))
        page.locator("#neurons_plot").screenshot(path=str(SCREENSHOTS / "neurons.png"))
        decay.scroll_into_view_if_needed()
        page.locator("#decay_plot").screenshot(path=str(SCREENSHOTS / "decay-curves.png"))
        explain_views(page, "smollm2", layer=15, head=0)

        plan, root = export_and_check(page, tmp_path, "smollm2")
        names = {f.name for f in root.iterdir()}
        assert {"config.json", "model.safetensors", "pruning_report.json"} <= names, names
        assert len(plan["layers"]) == 30
        page.locator("#export_btn").scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "export.png"))

        # then re-budget from the cached statistics (after the export: no second surgery needed)
        # type 50 into the slider's box
        tab(page, "Prune")
        box = page.locator("#sparsity input[type=number]")
        box.fill("50")
        box.press("Enter")
        text = wait_status(page, r"^✓ Planned to remove", 60_000)
        assert abs(float(re.search(r"remove (\d+\.\d)%", text).group(1)) - 50) < 1.0, text
        page.wait_for_function("n => !document.querySelector('#heads_plot .gtitle').textContent"
                               ".includes('heads: ' + n + '/')", arg=kept_30, timeout=30_000)
        tab(page, "Inspect")
        assert kept_heads(page) < kept_30  # the heatmap redrew for the larger budget
        page.locator("#heads_plot").screenshot(path=str(SCREENSHOTS / "heads-heatmap-50.png"))

    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)  # kept in pytest's tmp dir
        raise
    finally:
        page.close()


def load_demo(page, app_url: str, name: str):
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#load_btn").wait_for(timeout=60_000)
    if name != "smollm2-135m":
        page.get_by_label("demo model").click()
        page.locator("ul[role=listbox] li", has_text=name).first.click()
    page.locator("#load_btn").click()
    wait_status(page, rf"^✓ Loaded {name}", 120_000)


def set_sizes(page, samples: int, seq_len: int):
    for elem, value in (("#num_samples", str(samples)), ("#seq_len", str(seq_len))):
        box = page.locator(f"{elem} input")
        box.fill(value)
        box.press("Tab")


def export_and_check(page, tmp_path, name: str) -> dict:
    """Export, download the zip (a valid archive) and check that plan.json matches the weights' shapes;
    ``(plan, unpacked folder)``."""
    import json

    from safetensors import safe_open

    tab(page, "Export")
    page.locator("#export_btn").click()
    wait_status(page, r"^✓ Exported", 300_000, "status_export")
    link = page.locator("#export_zip a").first
    link.wait_for(timeout=30_000)
    with page.expect_download(timeout=120_000) as info:
        link.click()
    target = tmp_path / f"{name}.zip"
    info.value.save_as(target)
    assert info.value.suggested_filename.endswith(".zip")
    out = tmp_path / name
    with zipfile.ZipFile(target) as zf:
        assert zf.testzip() is None
        zf.extractall(out)
    root = next(out.iterdir())
    plan = json.loads((root / "plan.json").read_text())
    with safe_open(str(root / "model.safetensors"), "pt") as f:
        down = sorted(k for k in f.keys() if k.endswith(("mlp.down_proj.weight", "output.dense.weight"))
                      and "attention" not in k)
        widths = [f.get_slice(k).get_shape()[1] for k in sorted(down, key=lambda k: int(re.search(r"\.(\d+)\.", k).group(1)))]
    assert widths == [len(lp["kept_neurons"]) for lp in plan["layers"]], (name, widths)
    return plan, root


def test_two_sessions_at_once(app_url, browser, tmp_path):
    """Two users at once: B (the demo classifier) re-budgets while A's SmolLM2 calibration holds
    the device; each sees only its own results; both exports match their own plans. B also checks
    the explanation views on an encoder. B keeps the classifier's default calibration (read from the
    setup's cache, as a user's first prune is); A calibrates 4 × 256 tokens in the browser."""
    from stat_core.models import demo_model_dir

    for name in ("minilm-classifier", "smollm2-135m"):
        if not (demo_model_dir(name) / "config.json").exists():
            pytest.fail(f"the demo model {name} is not in the cache; run scripts/setup.sh")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ctx_a, ctx_b = (browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
                    for _ in range(2))
    a, b = ctx_a.new_page(), ctx_b.new_page()
    try:
        load_demo(b, app_url, "minilm-classifier")
        b.locator("#prune_btn").click()
        text = wait_status(b, r"^✓ Removed", CALIBRATION_TIMEOUT_MS)
        assert "from the calibration cache" in text, text
        tab(b, "Inspect")  # the heatmap lives in the Inspect tab
        b_heads_30 = kept_heads(b)
        explain_views(b, "classifier", layer=3, head=5)

        load_demo(a, app_url, "smollm2-135m")
        assert "9 / 3" in a.locator("#arch").inner_text() and "12" in b.locator("#arch").inner_text()
        set_sizes(a, 4, 256)
        a.locator("#prune_btn").click()
        a.wait_for_timeout(3000)   # A's job is running (calibration takes a minute or more)
        # B re-budgets while A's calibration holds the device queue
        tab(b, "Prune")
        box = b.locator("#sparsity input[type=number]")
        box.fill("50")
        box.press("Enter")
        text = wait_status(b, r"^✓ Planned to remove", 60_000)
        assert abs(float(re.search(r"remove (\d+\.\d)%", text).group(1)) - 50) < 1.0, text
        assert not status_value(a).startswith("✓ Removed"), "A finished before B's re-budget: nothing was tested"
        b.wait_for_function("n => !document.querySelector('#heads_plot .gtitle').textContent"
                            ".includes('heads: ' + n + '/')", arg=b_heads_30, timeout=30_000)
        tab(b, "Inspect")
        assert kept_heads(b) < b_heads_30

        text = wait_status(a, r"^✓ Removed", CALIBRATION_TIMEOUT_MS)
        assert abs(float(re.search(r"Removed (\d+\.\d)%", text).group(1)) - 30) < 1.0, text
        # each page shows its own model: 30 layers × 9 heads vs 6 layers × 12 heads
        tab(a, "Inspect")
        assert re.search(r"/270 kept", a.locator("#heads_plot .gtitle").first.text_content())
        assert re.search(r"/72 kept", b.locator("#heads_plot .gtitle").first.text_content())
        assert status_value(b).startswith("✓ Planned to remove")   # A's result never reached B

        plan_b, _ = export_and_check(b, tmp_path, "b")
        plan_a, _ = export_and_check(a, tmp_path, "a")
        assert len(plan_a["layers"]) == 30 and len(plan_b["layers"]) == 6
        assert abs(plan_b["budget"]["target"] - 0.5) < 1e-9 and abs(plan_a["budget"]["target"] - 0.3) < 1e-9
    except Exception:
        a.screenshot(path=str(tmp_path / "failure-a.png"), full_page=True)
        b.screenshot(path=str(tmp_path / "failure-b.png"), full_page=True)
        raise
    finally:
        ctx_a.close()
        ctx_b.close()


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory):
    """A tiny random Llama (2 layers × 4 heads) with the SmolLM2 tokenizer: the page's wiring in seconds."""
    from conftest import save_tiny_llama_with_demo_tokenizer

    return save_tiny_llama_with_demo_tokenizer(tmp_path_factory.mktemp("tiny-llama-browser"))


def load_tiny(page, app_url, tiny_decoder_dir):
    """Open the page and load the tiny model from its folder."""
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#load_btn").wait_for(timeout=60_000)
    page.get_by_role("radio", name="folder").check()
    page.get_by_label("local folder or hub id").fill(str(tiny_decoder_dir))
    page.locator("#load_btn").click()
    wait_status(page, r"^✓ Loaded", 60_000)


def load_tiny_with_pasted_text(page, app_url, tiny_decoder_dir):
    """Open the page, load the tiny model from its folder and paste 8 × 64 tokens of calibration text."""
    load_tiny(page, app_url, tiny_decoder_dir)
    page.get_by_role("radio", name="pasted").check()
    page.get_by_label("or paste text").fill("The history of the river valley begins with small farming villages. "
                                             "Trade routes crossed the region and towns grew around markets. " * 30)
    set_sizes(page, 8, 64)


def test_click_a_head_in_the_heatmap_and_recover(app_url, browser, tiny_decoder_dir, tmp_path):
    """Click-to-select: clicking a square of the heads heatmap opens that head in the head explorer
    (plotly's click event, hooked by the page script). The recovery checkbox runs recovery after the
    prune and says so in the status line."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        load_tiny_with_pasted_text(page, app_url, tiny_decoder_dir)
        page.locator("#recover_on input[type=checkbox]").check()
        box = page.locator("#recover_steps input")
        box.fill("3")
        box.press("Tab")
        page.locator("#prune_btn").click()
        text = wait_status(page, r"Recovered for 3 steps", 180_000)
        assert "Removed" in text, text
        tab(page, "Inspect")
        page.locator("#heads_plot .js-plotly-plot").wait_for(timeout=30_000)

        # click layer 1, head 2: the plot area spans heads -0.5..3.5 and layers -0.5..1.5 (layer 0 on top)
        area = page.locator("#heads_plot .nsewdrag").first.bounding_box()
        page.mouse.click(area["x"] + area["width"] * 2.5 / 4, area["y"] + area["height"] * 1.5 / 2)
        wait_status(page, r"^✓ Attention pattern drawn", 60_000, "status_inspect")
        info = page.locator("#head_info").inner_text()
        assert "Layer 1, head 2" in info and "Why:" in info, info
        assert page.locator("#head_layer input").input_value() == "1"
        assert page.locator("#head_index input").input_value() == "2"
        page.locator("#head_plot .js-plotly-plot").wait_for(timeout=30_000)
        # a second click picks another head
        page.mouse.click(area["x"] + area["width"] * 0.5 / 4, area["y"] + area["height"] * 0.5 / 2)
        page.wait_for_function("() => document.querySelector('#head_info').innerText.includes('Layer 0, head 0')",
                               timeout=60_000)
        # after a re-budget redraws the heatmap, a click still opens the head it lands on
        tab(page, "Prune")
        box = page.locator("#sparsity input[type=number]")
        box.fill("50")
        box.press("Enter")
        text = wait_status(page, r"^✓ Planned to remove", 60_000)
        assert "Recovery runs with Calibrate & prune" in text, text
        tab(page, "Inspect")
        page.wait_for_timeout(500)
        area = page.locator("#heads_plot .nsewdrag").first.bounding_box()
        page.mouse.click(area["x"] + area["width"] * 3.5 / 4, area["y"] + area["height"] * 1.5 / 2)
        page.wait_for_function("() => document.querySelector('#head_info').innerText.includes('Layer 1, head 3')",
                               timeout=60_000)
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        raise
    finally:
        page.close()


def test_learn_view_and_the_report_offline(app_url, browser, tiny_decoder_dir, tmp_path):
    """The Learn view draws its six steps for the chosen layer; the report button writes one HTML
    file, which opens in Chromium with every network request blocked and draws its figures."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    try:
        load_tiny(page, app_url, tiny_decoder_dir)
        assert page.locator("#estimate").inner_text().startswith("First calibration: about")
        page.get_by_role("radio", name="pasted").check()
        page.get_by_label("or paste text").fill("The history of the river valley begins with small farming villages. "
                                                 "Trade routes crossed the region and towns grew around markets. " * 30)
        set_sizes(page, 8, 64)
        page.locator("#prune_btn").click()
        wait_status(page, r"^✓ Removed", 180_000)

        tab(page, "Learn")
        page.locator("#learn_btn").click()
        text = wait_status(page, r"^✓ Lesson for layer 1", 120_000, "status_learn")
        for i in range(1, 6):
            page.locator(f"#learn_plot_{i} .js-plotly-plot").wait_for(timeout=30_000)
            assert re.search(r"\d", page.locator(f"#learn_text_{i}").inner_text())
        assert page.locator("#learn_effect span[title^='KL']").count() > 0
        page.screenshot(path=str(tmp_path / "learn.png"), full_page=True)

        tab(page, "Export")
        page.locator("#report_btn").click()
        wait_status(page, r"^✓ Wrote the report", 120_000, "status_export")
        link = page.locator("#report_file a").first
        link.wait_for(timeout=30_000)
        with page.expect_download(timeout=60_000) as info:
            link.click()
        report = tmp_path / "report.html"
        info.value.save_as(report)
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        raise
    finally:
        page.close()

    # the report offline: any request that is not the file itself is aborted (and counted)
    ctx = browser.new_context(viewport={"width": 1300, "height": 900})
    fetched = []

    def block(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            fetched.append(route.request.url)
            route.abort()

    ctx.route("**/*", block)
    offline = ctx.new_page()
    try:
        offline.goto(report.as_uri(), wait_until="load")
        offline.locator(".plotly .main-svg").first.wait_for(timeout=60_000)
        assert offline.locator(".js-plotly-plot").count() >= 4
        assert offline.locator(".js-plotly-plot .heatmaplayer").count() >= 2   # heads and neurons
        assert "The plan, layer by layer" in offline.content()
        assert fetched == [], fetched
        offline.screenshot(path=str(tmp_path / "report.png"), full_page=False)  # a tiny random model: not in the docs
    finally:
        ctx.close()


def _summary_target(page) -> str:
    return re.search(r"target (\d+)% of block", page.locator("#summary").inner_text()).group(1)


def test_slider_keys_and_drag_end_on_the_slider_value_and_a_reload_restores(app_url, browser, tiny_decoder_dir,
                                                                             tmp_path):
    """Every way of moving the budget slider ends with the plan, the status and the figures at the
    slider's value (arrow keys pressed quickly, a drag); reloading the page brings the model, its
    calibration and the plan back, slider included."""
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    try:
        load_tiny_with_pasted_text(page, app_url, tiny_decoder_dir)
        page.locator("#prune_btn").click()
        wait_status(page, r"^✓ Removed", 120_000)
        assert _summary_target(page) == "30"
        rng = page.locator("#sparsity input[type=range]")
        # arrow keys, quickly: 30 → 35
        rng.focus()
        for _ in range(5):
            page.keyboard.press("ArrowRight")
        page.wait_for_function("() => document.querySelector('#summary').innerText.includes('target 35%')",
                               timeout=30_000)
        assert rng.input_value() == "35"
        assert status_value(page).startswith("✓ Planned to remove"), status_value(page)
        # a drag to the left end region: the plan follows the value where the mouse is released
        box = rng.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] / 2)
        page.mouse.down()
        for frac in (0.3, 0.25, 0.2, 0.15):
            page.mouse.move(box["x"] + box["width"] * frac, box["y"] + box["height"] / 2, steps=3)
        page.mouse.up()
        value = rng.input_value()
        page.wait_for_function("v => document.querySelector('#summary').innerText.includes('target ' + v + '%')",
                               arg=value, timeout=30_000)
        assert value != "35"
        # reload: the session comes back
        page.reload(wait_until="domcontentloaded")
        text = wait_status(page, r"^✓ Restored your session", 60_000)
        assert "the plan removes" in text, text
        assert page.locator("#sparsity input[type=range]").input_value() == value
        assert _summary_target(page) == value
        tab(page, "Inspect")
        page.locator("#heads_plot .js-plotly-plot").wait_for(timeout=30_000)
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        raise
    finally:
        page.close()


def test_method_settings_are_controls_of_their_types(app_url, browser, tiny_decoder_dir):
    """The chosen method's settings are controls built from its settings dataclass (a checkbox for a
    flag, a list for a choice, a number box for a number): changing one writes the settings text and
    re-plans; another method shows its own controls."""
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    try:
        load_tiny_with_pasted_text(page, app_url, tiny_decoder_dir)
        page.locator("#prune_btn").click()
        wait_status(page, r"^✓ Removed", 120_000)
        settings_text = page.locator("#method_settings textarea")
        assert page.locator("#settings_stat").is_visible() and not page.locator("#settings_flap").is_visible()
        page.locator("#settings_stat").get_by_label("protect_induction").fill("2")
        page.locator("#settings_stat").get_by_label("protect_induction").press("Enter")
        page.wait_for_function("() => document.querySelector('#method_settings textarea').value"
                               " === 'protect_induction=2'", timeout=30_000)
        box = page.locator("#method input")
        box.click()
        box.fill("FLAP")
        page.locator("ul[role=listbox] li", has_text="FLAP").first.click()
        page.locator("#settings_flap").wait_for(state="visible", timeout=30_000)
        assert not page.locator("#settings_stat").is_visible() and settings_text.input_value() == ""
        metric = page.locator("#settings_flap input")
        metric.click()
        page.locator("ul[role=listbox] li", has_text="WIFN").first.click()
        page.wait_for_function("() => document.querySelector('#method_settings textarea').value === 'metric=WIFN'",
                               timeout=30_000)
        wait_status(page, r"flap", 60_000)
    finally:
        page.close()
