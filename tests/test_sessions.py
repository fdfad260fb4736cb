"""Memory per session is bounded: the store keeps at most ``max_sessions`` idle sessions, an evicted
session's models are really freed, and a session with a handler running is never evicted."""

import gc
import weakref

import gradio as gr
import pytest

from stat_app import handlers as H
from stat_app.sessions import SessionStore

from conftest import tiny_model

TEXT = ("The history of the river valley begins with small farming villages along the banks. Over the "
        "centuries trade routes crossed the region and towns grew around markets, bridges and mills. ") * 40


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    from conftest import save_tiny_llama_with_demo_tokenizer

    return save_tiny_llama_with_demo_tokenizer(tmp_path_factory.mktemp("tiny-llama"))


def test_an_evicted_session_frees_its_models(decoder_dir):
    store = SessionStore(max_sessions=1, grace_seconds=0)
    a = store.get("a")
    assert H.load(a, "folder", str(decoder_dir)).ok
    assert H.calibrate(a, "pasted", pasted=TEXT, num_samples=4, seq_len=64).ok
    assert H.prune(a, 0.3).ok and H.measure(a, eval_tokens=256).ok and H.export(a).ok
    from stat_core.evaluation.suite import SuiteConfig

    assert H.compare(a, 0.3, eval_tokens=256, methods=("stat",), suite=True, suite_config=SuiteConfig.tiny()).ok
    held = {"dense": weakref.ref(a.model), "pruned": weakref.ref(a.pruned), "statistics": weakref.ref(a.calibration),
            "baseline": weakref.ref(a.dense_metrics["baseline"]), "suite reference": weakref.ref(a.suite_reference)}
    work = a.workdir
    store.get("b")                                   # one session too many: the idle "a" goes
    gc.collect()
    assert "a" not in store and len(store) == 1
    assert {name: ref() is None for name, ref in held.items()} == dict.fromkeys(held, True)
    assert not work.exists()
    assert "Load a model" in H.measure(a).message    # a late request from the evicted page says what to do


def test_busy_sessions_are_not_evicted_and_idle_ones_are():
    store = SessionStore(max_sessions=1, grace_seconds=0)
    a = store.get("a")
    a.model = tiny_model()
    with a.in_use():
        store.get("b")                               # over the cap, but "a" is busy: both kept
        assert "a" in store and "b" in store and a.model is not None
        store.get("c")                               # "b" is idle: evicted; "a" still busy
        assert "a" in store and "b" not in store and "c" in store
    assert a.active == 0
    store.get("d")                                   # "a" is idle now: back to one session
    assert list(store._sessions) == ["d"] and a.model is None


def test_idle_expiry_skips_busy_sessions():
    store = SessionStore(max_sessions=10, idle_seconds=60)
    a, b = store.get("a"), store.get("b")
    with a.in_use():
        a.last_used -= 120                           # both untouched for two minutes
        b.last_used -= 120
        store.get("c")
        assert "a" in store and "b" not in store    # "b" expired; "a" is in use
    assert "a" in store                              # the job just ended: "a" counts as used now
    a.last_used -= 120
    store.get("c")
    assert "a" not in store and a.model is None


def test_handlers_mark_their_session_busy(monkeypatch):
    seen = []
    store = SessionStore(max_sessions=1, grace_seconds=0)
    s = store.get("s")

    def spy(source, name):
        seen.append(s.active)
        store.get("other")                           # another user arrives while this handler runs
        raise ValueError("No such model")

    monkeypatch.setattr(H.pipeline, "model_reference", spy)
    reply = H.load(s, "folder", "x")
    assert not reply.ok and reply.message == "No such model."
    assert seen == [1] and s.active == 0 and "s" in store


def test_a_reloaded_page_takes_its_session_back(decoder_dir):
    """Reload: the page's session is detached (not dropped) and the same browser's token brings the
    model, calibration and plan back under the new page's key; another browser's page (no token, a
    wrong token) gets nothing; an unclaimed detached session goes after the resume window."""
    from types import SimpleNamespace

    from stat_app.app import build_demo

    store = SessionStore(max_sessions=4)
    demo = build_demo(store)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    first = SimpleNamespace(session_hash="page-1")
    out = fns["on_load"]("folder", "", str(decoder_dir), "cpu", first)
    assert out[0].startswith("✓") and isinstance(out[-1], str) and len(out[-1]) >= 24
    token = out[-1]
    session = store.find("page-1")
    assert H.calibrate(session, "pasted", pasted=TEXT, num_samples=4, seq_len=64).ok and H.replan(session, 0.3).ok
    plan = session.plan
    fns["on_unload"](first)                          # the reload closes the old page
    assert "page-1" in store and session.model is not None
    assert fns["on_page_open"](None, SimpleNamespace(session_hash="stranger"))[0] == gr.update()
    assert fns["on_page_open"]("not-a-token", SimpleNamespace(session_hash="stranger"))[-1] is None
    back = fns["on_page_open"](token, SimpleNamespace(session_hash="page-2"))
    assert back[0].startswith("✓ Restored your session") and "the plan removes" in back[0], back[0]
    assert back[-1] == token and back[-2]["value"] == 30
    assert "page-2" in store and "page-1" not in store and store.find("page-2") is session and session.plan is plan
    # a page closed for good: gone once the resume window has passed
    fns["on_unload"](SimpleNamespace(session_hash="page-2"))
    session.detached_at -= store.resume_seconds + 1
    store.get("someone")
    assert "page-2" not in store and session.model is None
    assert fns["on_page_open"](token, SimpleNamespace(session_hash="page-3"))[-1] is None
    store.drop("someone")


def test_slider_moves_faster_than_plans_end_on_the_last_value(decoder_dir, monkeypatch):
    """Arrow keys from 60 to 55 while each plan takes a while: plans run one at a time per session, a
    request superseded while it waited computes nothing, and the plan (status, figures) ends at 55."""
    import threading
    import time
    from types import SimpleNamespace

    from stat_app.app import build_demo

    store = SessionStore(max_sessions=2)
    demo = build_demo(store)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    req = SimpleNamespace(session_hash="u")
    assert fns["on_load"]("folder", "", str(decoder_dir), "cpu", req)[0].startswith("✓")
    session = store.find("u")
    assert H.calibrate(session, "pasted", pasted=TEXT, num_samples=4, seq_len=64).ok and H.replan(session, 0.3).ok
    real, computed = H.replan, []

    def slow(s, fraction, *a, **k):
        computed.append(round(100 * fraction))
        time.sleep(1.0 if round(100 * fraction) == 60 else 0.1)
        return real(s, fraction, *a, **k)

    monkeypatch.setattr(H, "replan", slow)
    results = {}

    def move(value):
        results[value] = fns["on_rebudget"](value, "params", False, "one-shot", "stat", "all layers", False, "", req)

    threads = []
    for value in (60, 59, 58, 57, 56, 55):
        threads.append(threading.Thread(target=move, args=(value,)))
        threads[-1].start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert computed[0] == 60 and computed[-1] == 55 and len(computed) < 6   # superseded ones skipped
    assert round(100 * session.prune_config.sparsity) == 55
    assert "55" in results[55][0] or results[55][0].startswith("✓")
    skipped = [v for v in (59, 58, 57, 56) if v not in computed]
    assert skipped and all(all(x == gr.update() for x in results[v]) for v in skipped)
    store.drop("u")
