"""The served app, driven through its API with ``gradio_client`` (in-process server, tiny model)."""

import re
import socket
import zipfile

import pytest

from test_app_handlers import LOREM, decoder_dir  # noqa: F401  (fixture)

# gradio's own queue code trips pandas 3 deprecation warnings; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")


def removed_percent(status: str) -> float:
    return float(re.search(r"(\d+(?:\.\d+)?)% of the block", status).group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    from stat_app.app import build_demo, launch
    from stat_app.sessions import SessionStore

    store = SessionStore()
    demo = build_demo(store)
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", demo, store
    finally:
        demo.close()


def test_cli_flags_bind_localhost_by_default():
    from stat_app.app import build_parser

    assert build_parser().parse_args([]).host == "127.0.0.1"
    args = build_parser().parse_args(["--port", "9000", "--expose"])
    assert args.port == 9000 and args.expose


def test_load_prune_rebudget_measure_export(server, decoder_dir):  # noqa: F811
    from gradio_client import Client

    url, demo, store = server
    assert demo.server_name == "127.0.0.1"
    c = Client(url, verbose=False)
    other = Client(url, verbose=False)

    status, arch, *_ = c.predict("folder", "smollm2-135m", str(decoder_dir), "cpu", api_name="/load")
    assert status.startswith("✅ Loaded") and "4 / 2" in arch
    bad = c.predict("folder", "smollm2-135m", "/no/such/folder", "cpu", api_name="/load")[0]
    assert bad.startswith("⚠️") and "does not exist" in bad and "Traceback" not in bad

    out = c.predict("pasted", "wikipedia", None, LOREM * 40, 8, 64, 30, "params", False, "one-shot", "all layers",
                    api_name="/prune")
    status, heads, neurons, decay, layer_pick, summary = out[:6]
    assert status.startswith("✅ Removed") and "Calibrated on 512 tokens" in status, status
    assert abs(removed_percent(status) - 30) < 2
    assert "removed **" in summary
    for plot in (heads, neurons, decay):
        assert plot["type"] == "plotly" and "heatmap" in plot["plot"] or "scatter" in plot["plot"]

    status, *_ = c.predict(50, "params", False, "one-shot", "all layers", api_name="/rebudget")
    assert status.startswith("✅ Planned to remove") and abs(removed_percent(status) - 50) < 2, status
    decay = c.predict("layer 1", api_name="/decay")
    assert "Layer 1" in decay["plot"]

    status, table = c.predict(512, api_name="/measure")
    assert status.startswith("✅ Perplexity"), status
    assert table["data"][0][0].startswith("perplexity (quick")

    # another user's session sees none of this
    assert "Load a model" in other.predict(512, api_name="/measure")[0]
    assert len(store) >= 2

    pytest.importorskip("stat_core.export", reason="stat_core.export not merged yet")
    status, zip_path, report_path = c.predict(api_name="/export")
    assert status.startswith("✅ Exported"), status
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    assert any(n.endswith("config.json") for n in names) and any(n.endswith("model.safetensors") for n in names)
    assert report_path.endswith(".json")
