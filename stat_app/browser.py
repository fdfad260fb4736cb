"""Drive the served app in a real headless Chromium (Playwright with Debian's /usr/bin/chromium).

Shared by the browser test (``tests/test_app_browser.py``) and the timing benchmark
(``benchmarks/app_timings.py``): serve the app on a free local port, start the browser, and the few
page actions both need (read or wait for a tab's status line, open a tab, wait for a drawn plot).
Playwright is a test dependency (``pip install -e .[test]``); it is imported only when a browser starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(demo=None):
    """The app (``build_demo()`` unless given) served on a free local port in this process; yields its URL."""
    from stat_app.app import build_demo, launch

    demo = build_demo() if demo is None else demo
    port = free_port()
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextlib.contextmanager
def serve_process(env: dict | None = None, timeout_s: float = 300):
    """The app in its own process, as a user starts it (``python -m stat_app.app --port N``, with
    ``env`` added to this environment); yields its URL once it answers, stops it (SIGTERM) on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "stat_app.app", "--port", str(port)],
                                env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
                    raise RuntimeError(f"The app exited (code {proc.returncode}) before serving: {tail[0]}")
                try:
                    urllib.request.urlopen(url, timeout=5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"The app did not answer on {url} within {timeout_s:.0f} s.") from None
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def missing_chromium() -> str | None:
    """One sentence if Debian's Chromium is not installed, else None."""
    if Path(CHROMIUM).exists():
        return None
    return (f"{CHROMIUM} is missing: the browser runs need Debian's chromium "
            "(scripts/setup.sh installs it: apt-get install -y chromium).")


@contextlib.contextmanager
def chromium():
    """A headless Chromium (Playwright ``Browser``), closed on exit."""
    problem = missing_chromium()
    if problem:
        raise RuntimeError(problem)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_app(page, app_url: str, timeout_ms: int = 60_000) -> None:
    """Open the page and wait until Gradio has drawn it (the Load button is there). Not "networkidle":
    that never comes, the heartbeat stream stays open."""
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#load_btn").wait_for(timeout=timeout_ms)


def status_value(page, box: str = "status") -> str:
    return page.locator(f"#{box} textarea").input_value()


def wait_status(page, pattern: str, timeout_ms: int, box: str = "status", polling_ms: int = 500) -> str:
    """Wait until the status box ``box`` (each tab has its own) matches ``pattern``; fail fast with
    its text if it shows a warning. Returns the text."""
    rx = re.compile(pattern)
    page.wait_for_function(
        """([sel, pat]) => { const el = document.querySelector(sel);
             return el && (new RegExp(pat).test(el.value) || el.value.startsWith('⚠')); }""",
        arg=[f"#{box} textarea", pattern], timeout=timeout_ms, polling=polling_ms)
    text = status_value(page, box)
    assert rx.search(text), text
    return text


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def wait_heatmaps_drawn(page, plots=("heads_plot", "neurons_plot"), timeout_ms: int = 60_000,
                        polling_ms: int = 50) -> None:
    """Wait until every plot in ``plots`` shows a drawn plotly heatmap: a visible figure whose heatmap
    layer holds its image (plotly draws a heatmap as one ``<image>`` with the cells' pixels)."""
    page.wait_for_function(
        """ids => ids.every(id => {
             const gd = document.querySelector('#' + id + ' .js-plotly-plot');
             if (!gd || !gd.offsetParent || !gd.data || !gd.data.length) return false;
             const img = gd.querySelector('.heatmaplayer image');
             return !!(img && (img.getAttribute('href') || img.getAttribute('xlink:href') || '').startsWith('data:'));
           })""",
        arg=list(plots), timeout=timeout_ms, polling=polling_ms)
