"""Memory per session is bounded: the store keeps at most ``max_sessions`` idle sessions, an evicted
session's models are really freed, and a session with a handler running is never evicted."""

import gc
import weakref

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
