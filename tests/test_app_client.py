"""The served app, driven through its API with ``gradio_client`` (in-process server, tiny model)."""

import re
import socket
import zipfile

import pytest
import torch

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
    assert status.startswith("✓ Loaded") and "4 / 2" in arch
    bad = c.predict("folder", "smollm2-135m", "/no/such/folder", "cpu", api_name="/load")[0]
    assert bad.startswith("⚠") and "does not exist" in bad and "Traceback" not in bad

    out = c.predict("pasted", "wikipedia", None, LOREM * 40, 8, 64, 30, "params", False, "one-shot", "stat", "all layers",
                    api_name="/prune")
    status, heads, neurons, decay, spectrum, layer_pick, summary = out[:7]
    assert status.startswith("✓ Removed") and "Calibrated on 512 tokens" in status, status
    assert abs(removed_percent(status) - 30) < 2
    assert "removed **" in summary
    for plot, trace in ((heads, '"heatmap"'), (neurons, '"heatmap"'), (decay, '"scatter"'), (spectrum, '"bar"')):
        assert plot["type"] == "plotly" and trace in plot["plot"], (trace, plot["plot"][:200])

    status, *_ = c.predict(50, "params", False, "one-shot", "stat", "all layers", api_name="/rebudget")
    assert status.startswith("✓ Planned to remove") and abs(removed_percent(status) - 50) < 2, status
    decay, spectrum = c.predict("layer 1", api_name="/decay")
    assert "Layer 1" in decay["plot"] and "singular-value decay" in spectrum["plot"]
    # a published peer re-plans from the same cached statistics (its plan has no damage curves)
    status, heads, _neurons, decay_flap, *_ = c.predict(40, "params", False, "one-shot", "flap", "all layers",
                                                        api_name="/rebudget")
    assert status.startswith("✓ Planned to remove") and "flap" in status and abs(removed_percent(status) - 40) < 2
    assert "does not compute damage curves" in decay_flap["plot"]
    status, *_ = c.predict(50, "params", False, "one-shot", "stat", "all layers", api_name="/rebudget")
    # the method settings box (its last input): a name the method does not have is one sentence
    status, *_ = c.predict(50, "params", False, "one-shot", "stat", "all layers", False, "bogus=1",
                           api_name="/rebudget")
    assert status.startswith("⚠") and "'bogus=1' is not a setting of STAT" in status, status
    status, *_ = c.predict(50, "params", False, "one-shot", "stat", "all layers", api_name="/rebudget")

    status, table = c.predict(512, api_name="/measure")
    assert status.startswith("✓ Perplexity"), status
    assert table["data"][0][0].startswith("perplexity (quick")

    # Compare with the suite ticked: the page's checkbox reaches the handler (the dense row first)
    status, table, _plot = c.predict(50, "params", False, 512, ["stat", "magnitude"], True, api_name="/compare")
    assert status.startswith("✓ Dense quick perplexity") and "Best: perplexity" in status, status
    assert "few-shot AUC" in table["headers"] and "KL to dense" in table["headers"]
    assert [row[0].split(" ")[0] for row in table["data"]] == ["dense", "STAT", "magnitude"]

    # another user's session sees none of this
    n_sessions = len(store)
    assert "Load a model" in other.predict(512, api_name="/measure")[0]
    assert len(store) == n_sessions  # a request without a loaded model creates no session

    status, zip_path, report_path = c.predict("safetensors (transformers)", api_name="/export")
    assert status.startswith("✓ Exported"), status
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    assert any(n.endswith("config.json") for n in names) and any(n.endswith("model.safetensors") for n in names)
    assert report_path.endswith(".json")


def test_cancel_button_stops_a_running_calibration(server, decoder_dir, monkeypatch):  # noqa: F811
    """Cancel sets the session's flag; the core's progress callback raises between layers, the
    queued event is cancelled, and the session keeps its dense model and no half calibration."""
    import threading
    import time

    from gradio_client import Client

    from stat_app import handlers as H
    from stat_app.sessions import Cancelled

    url, _demo, store = server
    c = Client(url, verbose=False)
    assert c.predict("folder", "smollm2-135m", str(decoder_dir), "cpu", api_name="/load")[0].startswith("✓")
    session = store.get(c.session_hash)
    dense = {k: v.clone() for k, v in session.model.state_dict().items()}
    started, stopped = threading.Event(), threading.Event()
    outcome = []

    def slow_calibrate(model, data, config, progress=None, *_, **__):
        try:
            for i in range(600):  # a "layer" every 50 ms, 30 s in all unless cancelled
                started.set()
                progress("calibrate", i, 600)
                time.sleep(0.05)
            outcome.append("finished")
        except Cancelled:
            outcome.append("cancelled")
            raise
        finally:
            stopped.set()

    monkeypatch.setattr(H.pipeline, "calibrate", slow_calibrate)
    job = c.submit("pasted", "wikipedia", None, LOREM * 40, 8, 64, 30, "params", False, "one-shot", "stat", "all layers",
                   api_name="/prune")
    assert started.wait(60)
    assert "Cancelled" in c.predict(api_name="/cancel")
    assert stopped.wait(10) and outcome == ["cancelled"]
    assert session.calibration is None and session.plan is None
    assert all(torch.equal(v, dense[k]) for k, v in session.model.state_dict().items())
    deadline = time.time() + 10
    while not job.done() and time.time() < deadline:
        time.sleep(0.1)
    assert job.done()
