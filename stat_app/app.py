"""The Gradio app: ``stat-app [--port N] [--host H | --expose]``.

A thin shell over :mod:`stat_app.handlers`: each event looks up the caller's own
:class:`~stat_app.sessions.Session` by ``request.session_hash``, calls one handler and turns its
:class:`~stat_app.handlers.Reply` into component updates and plotly figures. Heavy events share one
queue slot (``concurrency_id="device"``, ``concurrency_limit=1``): one job holds the device at a
time, while other users can still browse their own results.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

import gradio as gr
import pandas as pd

from stat_app import figures as F
from stat_app.access import ModelAccess
from stat_app import handlers as H
from stat_app.sessions import MAX_SESSIONS, SessionStore, remove_stale_workdirs
from stat_core.data.labelled import BUILTIN_SETS
from stat_core.models import DEMO_MODELS

log = logging.getLogger("stat_app")

DEFAULT_PORT = 7860
MAX_UPLOAD = "200mb"   # the same cap as stat_core.data.sources.MAX_INPUT_BYTES
STAGE_LABELS = {"sensitivity": "Loss-sensitivity pass", "calibrate": "Calibrating layers",
                "analyse": "Decomposing layers", "propagate": "Propagating (re-calibrating pruned layers)",
                "compare": "Pruning and scoring each method", "surgery": "Cutting the pruned copy",
                "spectra": "Singular values of every layer (for the inspect views)",
                "recover": "Recovery: distilling the pruned copy towards the dense model",
                "dense windows": "Suite reference: dense model on the evaluation text",
                "dense few-shot": "Suite reference: dense few-shot prompts",
                "dense analogies": "Suite reference: dense analogies",
                "dense answers": "Suite reference: dense chat answers",
                "dense instructions": "Suite reference: dense chat log-probabilities"}
DECODER_DEFAULTS = {"builtin": "wikipedia", "num_samples": 64, "seq_len": 512}
CLASSIFIER_DEFAULTS = {"builtin": "newsgroups", "num_samples": 100, "seq_len": 128}

INTRO = """# STAT workbench
Remove whole attention heads and MLP neurons from a trained transformer and fold a least-squares
correction into the next layer (*STAT: Shrinking Transformers After Training*, Flynn et al. 2024).
**Load** a model → pick **calibration** text → set a **target** and prune → **inspect** what went and why →
**compare** before/after and against simpler methods → **export** the smaller model.
Once calibrated, moving the sparsity slider re-plans from the cached statistics in seconds."""

CSS = """
#status textarea {font-weight: 600}
.stat-section h2 {margin-top: 0.4em}
#heads_plot .nsewdrag {cursor: pointer}
"""

# Click-to-select in the heads heatmap. gr.Plot has no select event (Gradio 6: only .change), so a
# page script listens to plotly's own click event on the rendered figure (the graph div Gradio
# draws it into), writes the clicked cell's layer and head into the head explorer's two number
# boxes and presses its button: the same handler and the same queue as typing them in.
HEATMAP_CLICK_JS = """
() => {
  if (window.__statHeadClick) return;
  window.__statHeadClick = true;
  const setNumber = (id, value) => {
    const box = document.querySelector('#' + id + ' input');
    if (!box) return;
    box.value = String(value);
    box.dispatchEvent(new Event('input', {bubbles: true}));
    box.dispatchEvent(new Event('change', {bubbles: true}));
  };
  const hook = () => document.querySelectorAll('#heads_plot .js-plotly-plot').forEach(gd => {
    if (gd.__statHooked || typeof gd.on !== 'function') return;
    gd.__statHooked = true;
    gd.on('plotly_click', ev => {
      const pt = ev && ev.points && ev.points[0];
      if (!pt || pt.z === null || pt.z === undefined || Number.isNaN(pt.z)) return;  // no head there
      const layer = Number(pt.y), head = parseInt(String(pt.x).replace(/^h/, ''), 10);
      if (!Number.isInteger(layer) || !Number.isInteger(head)) return;
      setNumber('head_layer', layer);
      setNumber('head_index', head);
      setTimeout(() => { const b = document.querySelector('#head_btn'); if (b) b.click(); }, 150);
    });
  });
  new MutationObserver(hook).observe(document.body, {childList: true, subtree: true});
  hook();
}
"""


def _gradio_progress(progress: gr.Progress | None):
    if progress is None:
        return None

    def fn(stage: str, done: int, total: int) -> None:
        unit = ("steps" if stage == "recover" or total <= 1 else "methods" if stage == "compare"
                else "batches" if stage.startswith("dense ") else "layers")
        progress((done, total), desc=STAGE_LABELS.get(stage, stage), unit=unit)
    return fn


def _status(reply: H.Reply) -> str:
    return ("✅ " if reply.ok else "⚠️ ") + reply.message


def _plan_outputs(session, layer_choice: str | None = None):
    """(heads figure, neurons figure, decay figure, spectrum figure, layer dropdown update, kept summary)."""
    plan = session.plan
    if plan is None:
        empty = F.empty_figure()
        return empty, empty, empty, empty, gr.update(choices=["all layers"], value="all layers"), ""
    choices = ["all layers"] + [f"layer {lp.layer}" for lp in plan.layers]
    value = layer_choice if layer_choice in choices else "all layers"
    r = session.report
    summary = (f"**{plan.method}**, {plan.mode}, target {r['sparsity_target']:.0%} of block "
               f"{'parameters' if r['budget_kind'] == 'params' else 'FLOPs'}"
               f"{' (uniform)' if r.get('uniform') else ''}: removed **{r['block_params_removed_fraction']:.1%}** of block "
               f"parameters and **{r['block_flops_removed_fraction']:.1%}** of block FLOPs; parameters "
               f"{r['params_before']:,} → {r['params_after']:,}; planning took {r['seconds_plan']:.2f} s"
               + (f", pruning {r['seconds_prune']:.1f} s." if "seconds_prune" in r else
                  " (from cached statistics; the pruned copy is built when you measure, generate or export).")
               + (f" Recovered for {r['recover']['steps']} steps ({r['seconds_recover']:.1f} s)." if "recover" in r else ""))
    why = H.plan_explanations(session)
    return (F.head_heatmap(plan), F.neuron_profile(plan, why["importance"], why["massive"]), _decay(plan, value),
            _spectrum(why, value),
            gr.update(choices=choices, value=value), summary)


def _layer_of(choice: str | None) -> int | None:
    return None if not choice or choice == "all layers" else int(choice.split()[-1])


def _decay(plan, choice: str | None):
    if plan is None:
        return F.empty_figure()
    if not any(lp.mlp_damage for lp in plan.layers):  # peers score units without a damage curve
        return F.empty_figure(f"{plan.method} does not compute damage curves; prune with STAT to see them.")
    return F.decay_curves(plan, _layer_of(choice))


def _spectrum(why: dict, choice: str | None):
    if not why:
        return F.empty_figure()
    return F.spectrum_figure(why["spectra"], _layer_of(choice))


def build_demo(store: SessionStore | None = None, access: ModelAccess | None = None) -> gr.Blocks:
    """The page; ``access`` (``--expose``) limits the model sources to what the operator allowed."""
    store = SessionStore() if store is None else store

    def session_of(request: gr.Request):  # never creates a session: only loading a model does
        return store.find(getattr(request, "session_hash", None))

    # --- event functions -----------------------------------------------------------------------
    def on_load(source, demo_name, path, device, request: gr.Request):
        session = session_of(request)
        name = demo_name if source == "demo" else path
        reply = H.load(session, source, name, device, access=access)
        if reply.ok:  # only a loaded model makes (and keeps) a session in the store
            store.adopt(session)
        else:  # the session keeps whatever it had loaded before
            return (_status(reply), H.architecture_markdown(session.arch), *[gr.update()] * 8)
        defaults = CLASSIFIER_DEFAULTS if session.encoder else DECODER_DEFAULTS
        empty = F.empty_figure()
        choices = list(BUILTIN_SETS) if session.encoder else list(H.DECODER_SOURCES)
        value = defaults["builtin"] if session.encoder else H.default_source(session.tokenizer)
        return (_status(reply), H.architecture_markdown(session.arch),
                gr.update(choices=choices, value=value),
                gr.update(value=defaults["num_samples"]), gr.update(value=defaults["seq_len"]),
                empty, empty, empty, empty, "")

    def on_prune(calib_source, builtin, upload, pasted, num_samples, seq_len, sparsity, budget_kind, uniform, mode,
                 method, layer_choice, recover_on, recover_steps, request: gr.Request, progress=gr.Progress()):
        session = session_of(request)
        event = session.begin_job()
        reply = H.calibrate_and_prune(
            session, dict(source=calib_source, builtin=builtin, file_path=upload, pasted=pasted,
                          num_samples=num_samples, seq_len=seq_len),
            dict(sparsity=sparsity, budget_kind=budget_kind, uniform=uniform, mode=mode, method=method or "stat",
                 recover_steps=recover_steps if recover_on else 0),
            progress=_gradio_progress(progress), cancel_event=event)
        installed = reply.ok or reply.data.get("plan") is not None   # (a cancelled recovery keeps its prune)
        return (_status(reply), *_plan_outputs(session, layer_choice), None if installed else gr.update())

    def on_rebudget(sparsity, budget_kind, uniform, mode, method, layer_choice, recover_on, request: gr.Request):
        session = session_of(request)
        if session.calibration is None:
            return ("Calibrate and prune once; after that the slider re-plans instantly.",
                    *_plan_outputs(session, layer_choice), gr.update())
        if mode != "one-shot":
            return ("Re-budgeting from cached statistics is one-shot only; press Prune to run propagate mode.",
                    *[gr.update()] * 6, gr.update())
        reply = H.replan(session, sparsity, budget_kind, uniform, method or "stat")
        note = " Recovery runs with Calibrate & prune, not on a re-budget." if reply.ok and recover_on else ""
        return (_status(reply) + note, *_plan_outputs(session, layer_choice), None if reply.ok else gr.update())

    def on_layer(choice, request: gr.Request):
        session = session_of(request)
        return _decay(session.plan, choice), _spectrum(H.plan_explanations(session), choice)

    def on_head(layer, head, text, request: gr.Request):
        reply = H.head_view(session_of(request), layer, head, text)
        if not reply.ok:
            return _status(reply), F.empty_figure(reply.message), ""
        return "✅ Attention pattern drawn.", F.attention_figure(reply["pattern"], reply["details"]), reply.message

    def on_measure(eval_tokens, request: gr.Request):
        session = session_of(request)
        reply = H.measure(session, int(eval_tokens), cancel_event=session.begin_job())
        if not reply.ok:
            return _status(reply), gr.update()
        return _status(reply), pd.DataFrame(reply["rows"], columns=H.METRIC_HEADERS)

    def on_generate(prompt, max_new_tokens, request: gr.Request):
        reply = H.generate(session_of(request), prompt, int(max_new_tokens))
        return _status(reply), reply.data.get("before", ""), reply.data.get("after", "")

    def on_compare(sparsity, budget_kind, uniform, eval_tokens, methods, suite, request: gr.Request,
                   progress=gr.Progress()):
        session = session_of(request)
        reply = H.compare(session, sparsity, budget_kind, uniform, int(eval_tokens), methods=methods,
                          suite=bool(suite), progress=_gradio_progress(progress), cancel_event=session.begin_job())
        if not reply.ok:
            return _status(reply), None, F.empty_figure(reply.message)
        return (_status(reply), pd.DataFrame(reply["rows"], columns=reply["headers"]),
                F.compare_figure(reply["results"], reply["dense"], reply["metric"]))

    def on_export(fmt, request: gr.Request, progress=gr.Progress()):
        progress(None, desc="Writing the model folder and zipping it")
        reply = H.export(session_of(request), fmt, cancel_event=session_of(request).begin_job())
        if not reply.ok:
            return _status(reply), None, None
        return _status(reply), reply["zip"], reply["report"]

    def on_cancel(request: gr.Request):
        session = session_of(request)
        session.cancel()
        return "⏹ Cancelled; the loaded (dense) model is unchanged."

    def on_unload(request: gr.Request):
        store.drop(getattr(request, "session_hash", None))

    # --- layout --------------------------------------------------------------------------------
    with gr.Blocks(title="STAT workbench", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        status = gr.Textbox(label="status", value="Load a model to start.", interactive=False, elem_id="status")

        gr.Markdown("## 1 · Model")
        with gr.Row():
            with gr.Column(scale=1):
                source = gr.Radio(["demo", "folder", "hub"], value="demo", label="source")
                demo_name = gr.Dropdown(list(DEMO_MODELS), value="smollm2-135m", label="demo model",
                                        info="; ".join(f"{k}: {v['description']}" for k, v in DEMO_MODELS.items()))
                path = gr.Textbox(label="local folder or hub id", placeholder="/path/to/model or org/name")
                device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="device")
                load_btn = gr.Button("Load model", variant="primary", elem_id="load_btn")
            with gr.Column(scale=1):
                arch = gr.Markdown(H.architecture_markdown({}), elem_id="arch")

        gr.Markdown("## 2 · Calibration text")
        with gr.Row():
            calib_source = gr.Radio(["builtin", "file", "pasted"], value="builtin", label="calibrate on")
            builtin = gr.Dropdown(list(H.DECODER_SOURCES), value="wikipedia", label="built-in text",
                                  info="decoders: mix = Wikipedia + the model's own chat answers (generated once, "
                                       "cached), wikipedia, self-generated; classifiers: labelled sets")
            num_samples = gr.Number(value=64, precision=0, minimum=1, maximum=4096, label="samples", elem_id="num_samples")
            seq_len = gr.Number(value=512, precision=0, minimum=8, maximum=8192, label="sequence length (tokens)",
                                elem_id="seq_len")
        with gr.Row():
            upload = gr.File(label="or upload: .txt / .json / .jsonl / .csv / .parquet (classifiers: text + label columns)",
                             file_types=[".txt", ".json", ".jsonl", ".csv", ".parquet"], type="filepath")
            pasted = gr.Textbox(label="or paste text", lines=4)

        gr.Markdown("## 3 · Target")
        with gr.Row():
            sparsity = gr.Slider(0, 90, value=30, step=1, label="remove % of block parameters / FLOPs",
                                 elem_id="sparsity")
            budget_kind = gr.Radio(["params", "flops"], value="params", label="budget counts")
            uniform = gr.Checkbox(False, label="uniform layers (same counts everywhere; stock-loadable export)")
            mode = gr.Radio(["one-shot", "propagate"], value="one-shot", label="mode",
                            info="propagate re-calibrates each layer on the pruned ones (slower, no instant re-budget)")
            method = gr.Dropdown(H.plan_method_choices(), value="stat", label="method", elem_id="method",
                                 info="STAT, a published peer or a baseline (SliceGPT: in Compare only)")
        with gr.Row():
            recover_on = gr.Checkbox(False, label="recover after pruning (short distillation towards the dense model)",
                                     info="KL on the output distributions + block-output MSE on the calibration "
                                          "text; shapes unchanged; as stat-prune --recover STEPS",
                                     elem_id="recover_on", scale=3)
            recover_steps = gr.Number(value=100, precision=0, minimum=1, maximum=100000, label="recovery steps",
                                      elem_id="recover_steps", scale=1)
        with gr.Row():
            prune_btn = gr.Button("Calibrate & prune", variant="primary", elem_id="prune_btn")
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel_btn")
        summary = gr.Markdown(elem_id="summary")

        gr.Markdown("## 4 · Inspect: what went and why")
        with gr.Row():
            with gr.Column():
                heads_plot = gr.Plot(label="layers × heads", elem_id="heads_plot")
                gr.Markdown(F.HEADS_CAPTION + " Click a square to open that head in the head explorer below.")
            with gr.Column():
                neurons_plot = gr.Plot(label="layers × neurons", elem_id="neurons_plot")
                gr.Markdown(F.NEURON_CAPTION)
        layer_pick = gr.Dropdown(["all layers"], value="all layers", label="singular values and decay curves for",
                                 elem_id="layer_pick")
        spectrum_plot = gr.Plot(label="singular-value decay", elem_id="spectrum_plot")
        gr.Markdown(F.SPECTRUM_CAPTION + " " + F.SPECTRUM_ALL_CAPTION)
        decay_plot = gr.Plot(label="decay curves", elem_id="decay_plot")
        gr.Markdown(F.DECAY_CAPTION)
        gr.Markdown("### Head explorer (click a head in the heatmap, or type its layer and number)")
        with gr.Row():
            head_layer = gr.Number(value=0, precision=0, minimum=0, label="layer", elem_id="head_layer", scale=1)
            head_index = gr.Number(value=0, precision=0, minimum=0, label="head", elem_id="head_index", scale=1)
            head_text = gr.Textbox(value="The cat sat on the mat because it was tired, so the dog slept.",
                                   label="sample text", scale=4)
            head_btn = gr.Button("Show this head", elem_id="head_btn", scale=1)
        head_info = gr.Markdown(elem_id="head_info")
        head_plot = gr.Plot(label="attention pattern", elem_id="head_plot")
        gr.Markdown(F.HEAD_CAPTION)

        gr.Markdown("## 5 · Before / after")
        with gr.Row():
            eval_tokens = gr.Slider(512, 16384, value=H.QUICK_EVAL_TOKENS, step=512,
                                    label="perplexity eval tokens (quick estimate; the README protocol uses 16,384)")
            measure_btn = gr.Button("Measure before / after", elem_id="measure_btn")
        metrics = gr.Dataframe(headers=H.METRIC_HEADERS, label="before / after", interactive=False, elem_id="metrics")
        with gr.Row():
            prompt = gr.Textbox(value="The history of the city", label="prompt (decoders)", scale=3)
            max_new = gr.Number(value=40, precision=0, minimum=1, maximum=512, label="new tokens", scale=1)
            gen_btn = gr.Button("Generate with both", scale=1)
        with gr.Row():
            gen_before = gr.Textbox(label="dense model", lines=4, interactive=False)
            gen_after = gr.Textbox(label="pruned model", lines=4, interactive=False)

        gr.Markdown("## 6 · Compare methods at the same budget")
        compare_methods = gr.CheckboxGroup(choices=H.method_choices(), value=list(H.COMPARE_METHODS),
                                           label="methods (STAT, the published peers, simple baselines; "
                                                 "SliceGPT runs its own pass over the calibration text)",
                                           elem_id="compare_methods")
        compare_suite = gr.Checkbox(value=False, elem_id="compare_suite",
                                    label="also run the evaluation suite on each (decoders: few-shot sentiment, "
                                          "analogies, chat agreement with the dense model; SmolLM2 on 2 CPU cores: "
                                          "about 2 min once for the dense reference, then about 1 min per method)")
        compare_btn = gr.Button("Compare the chosen methods at this budget", elem_id="compare_btn")
        compare_table = gr.Dataframe(headers=["method", "removed", "quality", "vs dense", "KL to dense"],
                                     interactive=False)
        compare_plot = gr.Plot(label="comparison")
        gr.Markdown(F.COMPARE_CAPTION)

        gr.Markdown("## 7 · Export")
        with gr.Row():
            export_format = gr.Dropdown(list(H.EXPORT_CHOICES), value=next(iter(H.EXPORT_CHOICES)),
                                        label="format (GGUF: Llama-family decoders; ONNX: logits only)",
                                        elem_id="export_format")
            export_btn = gr.Button("Export pruned model (zip)", elem_id="export_btn")
        with gr.Row():
            export_zip = gr.File(label="pruned model folder (zip)", interactive=False, elem_id="export_zip")
            export_report = gr.File(label="pruning report (JSON)", interactive=False, elem_id="export_report")

        # --- events -----------------------------------------------------------------------------
        heavy = dict(concurrency_limit=1, concurrency_id="device")
        plan_outputs = [heads_plot, neurons_plot, decay_plot, spectrum_plot, layer_pick, summary]
        load_evt = load_btn.click(on_load, [source, demo_name, path, device],
                                  [status, arch, builtin, num_samples, seq_len, heads_plot, neurons_plot, decay_plot,
                                   spectrum_plot, summary], api_name="load", **heavy)
        prune_evt = prune_btn.click(on_prune, [calib_source, builtin, upload, pasted, num_samples, seq_len, sparsity,
                                               budget_kind, uniform, mode, method, layer_pick, recover_on,
                                               recover_steps],
                                    [status, *plan_outputs, metrics], api_name="prune", **heavy)
        rebudget_inputs = [sparsity, budget_kind, uniform, mode, method, layer_pick, recover_on]
        # re-planning reads cached statistics only (well under a second): it stays out of the device
        # queue, so the slider responds while another user's job holds the device
        light = dict(concurrency_limit=2, concurrency_id="plans")
        # .input fires while dragging and on a typed value; "always_last" drops superseded requests
        rebudget_evts = [sparsity.input(on_rebudget, rebudget_inputs, [status, *plan_outputs, metrics],
                                        api_name="rebudget", trigger_mode="always_last", show_progress="minimal",
                                        **light)]
        for control in (budget_kind, uniform, method):
            rebudget_evts.append(control.input(on_rebudget, rebudget_inputs, [status, *plan_outputs, metrics],
                                               api_name=False, **light))
        layer_pick.input(on_layer, [layer_pick], [decay_plot, spectrum_plot], api_name="decay", show_progress="hidden")
        head_evt = head_btn.click(on_head, [head_layer, head_index, head_text], [status, head_plot, head_info],
                                  api_name="head", **heavy)
        measure_evt = measure_btn.click(on_measure, [eval_tokens], [status, metrics], api_name="measure", **heavy)
        gen_evt = gen_btn.click(on_generate, [prompt, max_new], [status, gen_before, gen_after], api_name="generate",
                                **heavy)
        compare_evt = compare_btn.click(on_compare,
                                        [sparsity, budget_kind, uniform, eval_tokens, compare_methods, compare_suite],
                                        [status, compare_table, compare_plot], api_name="compare", **heavy)
        export_evt = export_btn.click(on_export, [export_format], [status, export_zip, export_report], api_name="export",
                                      **heavy)
        cancel_btn.click(on_cancel, None, [status], api_name="cancel",
                         cancels=[load_evt, prune_evt, measure_evt, gen_evt, compare_evt, head_evt, export_evt, *rebudget_evts])
        demo.load(None, js=HEATMAP_CLICK_JS)
        demo.unload(on_unload)
    return demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stat-app", description="STAT workbench: prune transformers in the browser.")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--expose", action="store_true", help="bind 0.0.0.0 (reachable from other machines); users "
                   "then load demo models only, unless --allow-model-root / --allow-hub say otherwise")
    p.add_argument("--allow-model-root", action="append", default=[], metavar="PATH",
                   help="with --expose: let users load model folders under PATH (repeatable)")
    p.add_argument("--allow-hub", action="store_true", help="with --expose: let users download models from the hub")
    p.add_argument("--max-sessions", type=int, default=MAX_SESSIONS,
                   help=f"sessions kept in memory at once; the least recently used is dropped (default {MAX_SESSIONS})")
    return p


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **kwargs):
    demo.queue(default_concurrency_limit=4)
    kwargs.setdefault("max_file_size", MAX_UPLOAD)   # Gradio refuses bigger uploads with its own message
    return demo.launch(server_name=host, server_port=port, theme=gr.themes.Soft(), css=CSS, **kwargs)


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop the app as Ctrl-C does (Gradio closes its server and ``launch``
    returns), so the exit cleanup runs: the session folders go (``sessions.remove_own_workdirs``)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    host = "0.0.0.0" if args.expose else args.host
    local = host in ("127.0.0.1", "localhost", "::1")   # exposed: demo models only, unless the operator allows more
    if (args.allow_model_root or args.allow_hub) and local:
        build_parser().error("--allow-model-root and --allow-hub apply to a shared app; add --expose.")
    for root in args.allow_model_root:
        if not Path(root).expanduser().is_dir():
            build_parser().error(f"--allow-model-root {root}: no such folder.")
    access = None if local else ModelAccess.of(args.allow_model_root, args.allow_hub)
    for stale in remove_stale_workdirs():   # folders of app processes killed outright
        log.info("removed %s (left by a stopped app)", stale)
    _stop_on_signals()
    demo = build_demo(SessionStore(max_sessions=args.max_sessions), access)
    launch(demo, host, args.port)


if __name__ == "__main__":
    main()
