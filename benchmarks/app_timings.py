"""How long the app's buttons take on the demo models, through the app's own handlers.

What a user waits for in the browser, minus the page: load, the first calibration + prune at the
app's defaults (64 × 512 Wikipedia windows for the decoder, the labelled training half for the
classifier), a re-budget from the cached statistics (plan only, then the surgery that measuring,
generating or exporting triggers), the quick before/after measurement, and the export zip.

    .venv/bin/python -m benchmarks.app_timings            # both demo models, app defaults
    .venv/bin/python -m benchmarks.app_timings --quick    # 8 × 256 windows, decoder only
    .venv/bin/python -m benchmarks.app_timings --no-classifier --compare-suite stat,flap,slimgpt \
        --name app_compare_suite                          # + Compare with the evaluation suite ticked
    .venv/bin/python -m benchmarks.app_timings --first-heatmap-only --no-classifier   # cold vs warm only

The session's steps run with the calibration cache off (every calibration computed). Before them the
decoder's first Calibrate & prune runs twice more, each in a fresh session: cold (an empty calibration cache
in a temporary folder: the statistics are computed, then stored there) and warm (the same folder: read
back, as after ``scripts/setup.sh``): Calibrate & prune through the handlers plus building the Inspect
figures the app draws from the plan (the app's own ``_plan_outputs``), i.e. the page's wait minus the
browser's drawing (``first_heatmap.handlers``).

``first_heatmap_warm_s`` / ``first_heatmap_cold_s`` are what a user waits for in the real browser:
the app started as its own process (``python -m stat_app.app``, fresh for every run), the page opened
in headless Chromium (Playwright, the browser test's helpers in :mod:`stat_app.browser`), then from
the page drawn to the heatmaps drawn: Load model (the default demo model), Calibrate & prune at the
page's defaults, open the Inspect tab, until both heatmaps (heads, neurons) hold their pixels. Warm:
the app's own calibration cache as ``scripts/setup.sh`` leaves it (its step runs first: seconds if the
entry is there; the median of ``--browser-runs`` runs; a run that misses the cache is an error). Cold: once, with an empty temporary cache folder
(``--no-browser-cold`` skips its ~3 minutes). ``--browser-runs 0`` skips the browser.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import RESULTS, load_at_start, machine_note, tiny_llama, write_results
from stat_app import handlers as H
from stat_app.app import CLASSIFIER_DEFAULTS, DECODER_DEFAULTS
from stat_app.sessions import Session


def _timed(step: str, fn, *args, **kwargs) -> tuple[dict, object]:
    t = time.perf_counter()
    reply = fn(*args, **kwargs)
    seconds = time.perf_counter() - t
    if not reply.ok:
        raise RuntimeError(f"{step} failed: {reply.message}")
    return {"step": step, "seconds": seconds, "message": reply.message}, reply


def time_model(name: str, builtin: str, num_samples: int, seq_len: int, first: float, second: float,
               source: str = "demo", compare_suite: tuple[str, ...] = ()) -> list[dict]:
    """One user's session from load to export, each step timed as the handler runs it; with
    ``compare_suite`` also Compare at the first budget with the evaluation suite ticked (its table kept)."""
    session = Session(key=f"bench-{Path(name).name}")
    rows = []
    try:
        row, _ = _timed("load", H.load, session, source, name, device="cpu")
        rows.append(row)
        row, reply = _timed(f"first calibration + prune at {first:.0%}", H.calibrate_and_prune, session,
                            {"builtin": builtin, "num_samples": num_samples, "seq_len": seq_len},
                            {"sparsity": first})
        row["calibration_seconds"] = reply.data["calibration"].get("seconds")
        row["prune_seconds"] = reply.data.get("seconds")
        rows.append(row)
        row, _ = _timed(f"quick measure at {first:.0%} (dense + pruned)", H.measure, session)
        rows.append(row)
        if compare_suite:
            row, reply = _timed(f"compare at {first:.0%} with the suite: {', '.join(compare_suite)} "
                                "(dense reference built first)", H.compare, session, first,
                                methods=compare_suite, suite=True)
            row["table"] = {"headers": reply["headers"], "rows": reply["rows"]}
            rows.append(row)
        row, _ = _timed(f"re-budget to {second:.0%}: new plan from cached statistics", H.replan, session, second)
        rows.append(row)
        t = time.perf_counter()
        H.ensure_pruned(session)
        rows.append({"step": f"re-budget to {second:.0%}: surgery on a copy", "seconds": time.perf_counter() - t,
                     "message": ""})
        row, _ = _timed(f"quick measure at {second:.0%} (dense cached)", H.measure, session)
        rows.append(row)
        row, _ = _timed("export zip", H.export, session)
        rows.append(row)
    finally:
        session.close()
    for r in rows:
        r["model"] = name
        print(f"{name:18s} {r['step']:52s} {r['seconds']:8.1f} s  {r['message'][:90]}", flush=True)
    return rows


@contextlib.contextmanager
def _environment(**values):
    """Environment variables set inside the ``with``, restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def first_heatmap(name: str, builtin: str, num_samples: int, seq_len: int, sparsity: float, source: str = "demo"
                  ) -> dict:
    """Seconds from pressing Calibrate & prune (model loaded) to the Inspect figures, cold and warm:
    each in a fresh session, the calibration cache pointed at one empty temporary folder."""
    from stat_app import app as A

    out = {}
    with tempfile.TemporaryDirectory() as cache, _environment(STAT_CALIBRATION_CACHE_DIR=cache,
                                                              STAT_CALIBRATION_CACHE="on"):
        for phase in ("cold", "warm"):
            session = Session(key=f"bench-first-{phase}")
            try:
                _timed("load", H.load, session, source, name, device="cpu")
                t = time.perf_counter()
                _, reply = _timed("calibrate + prune", H.calibrate_and_prune, session,
                                  {"builtin": builtin, "num_samples": num_samples, "seq_len": seq_len},
                                  {"sparsity": sparsity})
                handlers_s = time.perf_counter() - t
                plan_outputs = getattr(A, "_plan_outputs", None)
                if plan_outputs is not None:
                    plan_outputs(session)
                total = time.perf_counter() - t
                cal = reply.data["calibration"]
                if (phase == "warm") != bool(cal.get("disk_cache")):
                    raise RuntimeError(f"the {phase} run {'missed' if phase == 'warm' else 'hit'} the cache")
                out[f"first_heatmap_{phase}_s"] = total
                out[f"first_heatmap_{phase}_handlers_s"] = handlers_s
                out[f"first_heatmap_{phase}_calibrate_s"] = cal.get("seconds")
                out[f"first_heatmap_{phase}_message"] = reply.message
                print(f"{name:18s} first heatmap, {phase} cache: {total:6.1f} s (handlers {handlers_s:.1f} s, "
                      f"calibration {cal.get('seconds', 0):.1f} s)", flush=True)
            finally:
                session.close()
    out["first_heatmap_figures"] = "handlers + stat_app.app._plan_outputs (no browser)"
    return out


def browser_first_heatmap_run(browser, url: str, phase: str) -> dict:
    """One fresh page: seconds from the page drawn to both Inspect heatmaps drawn, split by step."""
    from stat_app.browser import open_app, tab, wait_heatmaps_drawn, wait_status

    load = os.getloadavg()[0]
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = ctx.new_page()
        t = time.perf_counter()
        open_app(page, url)
        t0 = time.perf_counter()
        page.locator("#load_btn").click()
        wait_status(page, r"^✓ Loaded", 120_000, polling_ms=50)
        t1 = time.perf_counter()
        page.locator("#prune_btn").click()
        text = wait_status(page, r"^✓ Removed", 1_200_000, polling_ms=50)
        t2 = time.perf_counter()
        tab(page, "Inspect")
        wait_heatmaps_drawn(page)
        t3 = time.perf_counter()
    finally:
        ctx.close()
    hit = "from the calibration cache" in text
    if hit != (phase == "warm"):
        raise RuntimeError(f"The {phase} browser run {'missed' if phase == 'warm' else 'hit'} the calibration cache "
                           f"({text!r}); the warm runs need the app's default entry: run scripts/setup.sh.")
    row = {"phase": phase, "seconds": t3 - t0, "open_page_s": t0 - t, "load_model_s": t1 - t0,
           "calibrate_prune_s": t2 - t1, "inspect_tab_s": t3 - t2, "load_average_1min": load, "status": text}
    print(f"browser first heatmap, {phase} cache: {row['seconds']:6.1f} s (load model {row['load_model_s']:.1f} s, "
          f"Calibrate & prune {row['calibrate_prune_s']:.1f} s, Inspect tab {row['inspect_tab_s']:.1f} s; "
          f"load average {load:.2f})", flush=True)
    return row


def browser_first_heatmap(runs: int = 3, cold: bool = True) -> dict:
    """``runs`` warm runs and (``cold``) one cold run, each against a freshly started app process."""
    from stat_app.browser import chromium, serve_process

    out = {"first_heatmap_figures": "page drawn → both Inspect heatmaps drawn, in headless Chromium (fresh app "
                                    "process per run: Load model, Calibrate & prune at the page's defaults, "
                                    "Inspect tab)"}
    from stat_core.setup_assets import warm_calibration_cache

    with _environment(STAT_CALIBRATION_CACHE="on"):   # as scripts/setup.sh: computed once if the entry is missing
        setup = warm_calibration_cache()
    out["setup_calibration"] = {k: setup.get(k) for k in ("hit", "seconds")}
    print(f"calibration cache as after scripts/setup.sh: {'already there' if setup['hit'] else 'computed'} "
          f"({setup['seconds']:.1f} s)", flush=True)
    with chromium() as browser:
        warm = []
        for _ in range(runs):
            with serve_process({"STAT_CALIBRATION_CACHE": "on"}) as url:
                warm.append(browser_first_heatmap_run(browser, url, "warm"))
        out["first_heatmap_warm_runs"] = warm
        out["first_heatmap_warm_s"] = statistics.median(r["seconds"] for r in warm)
        if cold:
            with tempfile.TemporaryDirectory() as cache, serve_process(
                    {"STAT_CALIBRATION_CACHE": "on", "STAT_CALIBRATION_CACHE_DIR": cache}) as url:
                out["first_heatmap_cold_run"] = browser_first_heatmap_run(browser, url, "cold")
            out["first_heatmap_cold_s"] = out["first_heatmap_cold_run"]["seconds"]
    return out


def tiny_decoder_folder(path: Path) -> Path:
    """A random 2-layer Llama with the demo model's tokenizer (smoke runs without the real weights)."""
    import shutil

    from stat_core.models import demo_model_dir

    tiny_llama(vocab=49152).save_pretrained(path)
    src = demo_model_dir("smollm2-135m")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy(src / f, path / f)
    return path


def first_heatmap_markdown(first: dict, model: str) -> list[str]:
    """The first-heatmap paragraph (and the browser runs' table) of the results file."""
    h = first["handlers"]
    lines = []
    if "first_heatmap_warm_s" in first:
        warm = first["first_heatmap_warm_runs"]
        cold = first.get("first_heatmap_cold_run")
        lines += [f"First heatmap on {model} at the app's defaults, in the real browser ({first['first_heatmap_figures']}): "
                  f"**{first['first_heatmap_warm_s']:.1f} s** with the calibration cache warm (as after "
                  f"`scripts/setup.sh`; median of {len(warm)} runs)"
                  + (f", **{first['first_heatmap_cold_s']:.1f} s** with it empty." if cold else "."), "",
                  "| run | cache | load average (1 min) | page drawn → heatmaps drawn | load model | Calibrate & prune "
                  "(click → status line) | Inspect tab → heatmaps drawn | what the app said |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(warm + ([cold] if cold else []), 1):
            lines.append(f"| {i} | {r['phase']} | {r['load_average_1min']:.2f} | {r['seconds']:.1f} s | "
                         f"{r['load_model_s']:.1f} s | {r['calibrate_prune_s']:.1f} s | {r['inspect_tab_s']:.1f} s | "
                         f"{r['status'].lstrip('✓ ').replace('|', '/')[:160]} |")
        lines.append("")
    lines.append(f"Through the handlers only, Calibrate & prune to the Inspect figures on {model} (fresh sessions, "
                 f"{h['first_heatmap_figures']}): **{h['first_heatmap_cold_s']:.1f} s** with an empty calibration "
                 f"cache, **{h['first_heatmap_warm_s']:.1f} s** with it warm.")
    return lines


def markdown(records: list[dict], meta: dict) -> str:
    rows_meta = meta.get("records_from", meta)   # --first-heatmap-only keeps an earlier full run's rows
    lines = [f"The app's handlers on {meta['device']} ({rows_meta['machine']['cpu_count']} cores, load average "
             f"{load_at_start(rows_meta)} at start), one run each; decoder calibrated on {meta['num_samples']} × "
             f"{meta['seq_len']} Wikipedia tokens (the app's defaults), classifier on its labelled training half "
             "(all its text, 128-token windows)"
             + (" — these rows from the previous full run; the first heatmap below from this one (load average "
                f"{load_at_start(meta)} at start)." if "records_from" in meta else "."), "",
             "| model | step | seconds | what the app said |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['step']} | {r['seconds']:.1f} | {r['message'].replace('|', '/')[:160]} |")
    first = meta.get("first_heatmap")
    if first:
        lines += ["", *first_heatmap_markdown(first, meta["first_heatmap_model"])]
    for r in records:
        if "table" in r:
            t = r["table"]
            lines += ["", f"The app's Compare table ({r['model']}, {r['step']}):", "",
                      "| " + " | ".join(t["headers"]) + " |", "|" + "---|" * len(t["headers"])]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in t["rows"]]
            lines += ["", r["message"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=DECODER_DEFAULTS["num_samples"], help="decoder windows")
    p.add_argument("--seq-len", type=int, default=DECODER_DEFAULTS["seq_len"])
    p.add_argument("--no-classifier", action="store_true")
    p.add_argument("--quick", action="store_true", help="8 × 256 windows, decoder only")
    p.add_argument("--tiny", action="store_true", help="a random 2-layer Llama, 2 × 32 tokens (smoke test)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--name", default="app_timings")
    p.add_argument("--compare-suite", default="", help="comma-separated methods: also time Compare with the suite")
    p.add_argument("--first-heatmap-only", action="store_true",
                   help="only the decoder's first Calibrate & prune, cold and warm calibration cache (with "
                        "--no-classifier the results file keeps its earlier step rows)")
    p.add_argument("--browser-runs", type=int, default=3,
                   help="warm first-heatmap runs in headless Chromium, median reported (0: no browser)")
    p.add_argument("--no-browser-cold", action="store_true", help="skip the browser's cold first heatmap (~3 min)")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.seq_len, args.no_classifier = 8, 256, True
    if args.tiny:
        args.num_samples, args.seq_len, args.no_classifier = 2, 32, True
    meta = {"device": "cpu", "machine": machine_note(), "num_samples": args.num_samples, "seq_len": args.seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        model, source = ((str(tiny_decoder_folder(Path(tmp))), "folder") if args.tiny else ("smollm2-135m", "demo"))
        methods = tuple(m.strip() for m in args.compare_suite.split(",") if m.strip())
        meta["first_heatmap_model"] = model if source == "demo" else "a tiny random Llama"
        handlers = first_heatmap(model, DECODER_DEFAULTS["builtin"], args.num_samples, args.seq_len, 0.3, source)
        page_defaults = (args.num_samples, args.seq_len) == (DECODER_DEFAULTS["num_samples"], DECODER_DEFAULTS["seq_len"])
        if args.browser_runs > 0 and source == "demo" and page_defaults:
            meta["first_heatmap"] = {**browser_first_heatmap(args.browser_runs, not args.no_browser_cold),
                                     "handlers": handlers}
        else:
            print("(no browser runs: they measure the demo decoder at the page's defaults)", flush=True)
            meta["first_heatmap"] = {"handlers": handlers}
        with _environment(STAT_CALIBRATION_CACHE="off"):  # the session's steps as computed without the cache
            records = [] if args.first_heatmap_only else time_model(
                model, DECODER_DEFAULTS["builtin"], args.num_samples, args.seq_len, 0.3, 0.5, source,
                compare_suite=methods)
    if not args.no_classifier:
        c = CLASSIFIER_DEFAULTS
        with _environment(STAT_CALIBRATION_CACHE="off"):
            records += time_model("minilm-classifier", c["builtin"], c["num_samples"], c["seq_len"], 0.3, 0.5)
    previous = Path(args.out_dir) / f"{args.name}.json"
    if args.first_heatmap_only and args.no_classifier and previous.exists():   # keep the full run's step rows
        import json

        old = json.loads(previous.read_text())
        if old.get("records"):
            records = old["records"]
            meta["records_from"] = {"machine": old["meta"].get("records_from", old["meta"])["machine"]}
    md = markdown(records, meta)
    print(md)
    write_results(Path(args.out_dir), args.name, {"meta": meta, "records": records}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
