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
from stat_core.config import parse_sparsity
from stat_core.data.labelled import BUILTIN_SETS
from stat_core.estimate import estimate_sentence
from stat_core.methods.registry import OWN_METHOD
from stat_core.data.recipe import CHAT, Recipe, resolve_recipe
from stat_core.models import DEMO_MODELS, demo_model_choices, demo_model_installed
from stat_core.progress import stage_unit

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
**Prune**: load a model, set a target, press the button · **Inspect** what went and why · **Learn** why it
works, on this model's own numbers · **Compare** before / after and against other methods · **Export**
the smaller model or a report to hand out."""

RELOAD_NOTE = ("*Reloading this page in the same browser within 10 minutes brings back the loaded model, its "
               "calibration and the current plan; after that (or in another browser) it starts a new session and the "
               "server frees their memory.*")

LEARN_INTRO = ("Why STAT works, step by step, for one layer of the loaded model after the current prune. Every "
               "number below is computed now from this model, its calibration text and the plan.")

CSS = """
.stat-status textarea {font-weight: 600}
.stat-status {position: sticky; top: 0; z-index: 20}
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
      const explorer = document.querySelector('#head_explorer');
      if (explorer) explorer.scrollIntoView({behavior: 'smooth', block: 'nearest'});
      setTimeout(() => { const b = document.querySelector('#head_btn'); if (b) b.click(); }, 150);
    });
  });
  new MutationObserver(hook).observe(document.body, {childList: true, subtree: true});
  hook();
}
"""


OK, WARN = "✓", "⚠"   # text glyphs every font draws (Debian's Chromium has no colour emoji font)


def _gradio_progress(progress: gr.Progress | None):
    if progress is None:
        return None

    def fn(stage: str, done: int, total: int) -> None:
        unit = ("steps" if stage == "recover" or total <= 1 else "methods" if stage == "compare"
                else stage_unit(stage) + "s")
        progress((done, total), desc=STAGE_LABELS.get(stage, stage), unit=unit)
    return fn


def _status(reply: H.Reply) -> str:
    return (f"{OK} " if reply.ok else f"{WARN} ") + reply.message


def _percent(value) -> float:
    """The slider's percent as a fraction (:func:`stat_core.config.parse_sparsity`, percent only, at most 90)."""
    return parse_sparsity(value, percent=True, max_percent=90)


def _slider_value(session) -> float:
    config = None if session is None else session.prune_config
    return 30 if config is None else round(100 * config.sparsity)


def _plan_outputs(session, layer_choice: str | None = None):
    """(heads figure, neurons figure, decay figure, spectrum figure, layer dropdown update, kept summary,
    Learn's layer dropdown update)."""
    plan = session.plan
    if plan is None:
        empty = F.empty_figure()
        return (empty, empty, empty, empty, gr.update(choices=["all layers"], value="all layers"), "",
                gr.update(choices=[], value=None))
    choices = ["all layers"] + [f"layer {lp.layer}" for lp in plan.layers]
    value = layer_choice if layer_choice in choices else "all layers"
    r = session.report
    summary = (f"**{plan.method}**, {plan.mode}, target {r['sparsity_target']:.0%} of block "
               f"{'parameters' if r['budget_kind'] == 'params' else 'FLOPs'}"
               f"{' (uniform)' if r.get('uniform') else ''}: removed **{r['block_params_removed_fraction']:.1%}** of block "
               f"parameters and **{r['block_flops_removed_fraction']:.1%}** of block FLOPs; parameters "
               f"{r['params_before']:,} → {r['params_after']:,}; "
               + (f"planning and pruning took {r['seconds_prune']:.1f} s." if "seconds_prune" in r else
                  f"planning took {r['seconds_plan']:.2f} s (from cached statistics; the pruned copy is built when "
                  "you measure, generate or export).")
               + (f" Recovered for {r['recover']['steps']} steps ({r['seconds_recover']:.1f} s)." if "recover" in r else "")
               + " See the **Inspect** and **Learn** tabs.")
    why = H.plan_explanations(session)
    learn_choices = [str(lp.layer) for lp in plan.layers]
    return (F.head_heatmap(plan, H.head_reasons(session)), F.neuron_profile(plan, why["importance"], why["massive"]),
            _decay(plan, value), _spectrum(why, value), gr.update(choices=choices, value=value), summary,
            gr.update(choices=learn_choices, value=learn_choices[len(learn_choices) // 2]))


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


#: The calibration the page starts with: the recipe of the demo decoder it opens with (a chat model), as
#: resolve_recipe gives it; loading a model sets the box to that model's recipe.
DEMO_RECIPE = Recipe("chat", *CHAT, sentence="")


def recipe_note(recipe: Recipe) -> str:
    """The calibration box's first line: which calibration the loaded model gets by default, and why."""
    if not recipe.sentence:
        return ("**Default calibration follows the model.** A chat model (like the demo `smollm2-135m`): units "
                "chosen on `mix` (half its own chat answers, half Wikipedia) with sensitivity labels from the model, "
                "corrections fitted on `wikipedia`. A decoder without a chat template: the same on `in-context`. "
                "Pick `wikipedia`, `data` and the same text for plain Wikipedia.")
    return f"**Default for this model.** {recipe.sentence.replace('`--calibration wikipedia`', 'Choosing wikipedia')}"


def build_demo(store: SessionStore | None = None, access: ModelAccess | None = None) -> gr.Blocks:
    """The page; ``access`` (``--expose``) limits the model sources to what the operator allowed."""
    store = SessionStore() if store is None else store

    def session_of(request: gr.Request):  # never creates a session: only loading a model does
        return store.find(getattr(request, "session_hash", None))

    n_plan = 7   # _plan_outputs' length

    # --- event functions -----------------------------------------------------------------------
    def on_load(source, demo_name, path, device, request: gr.Request, progress=gr.Progress()):
        session = session_of(request)
        name = demo_name if source == "demo" else path
        # what the wait is for (a hub download can take a while, or time out without a network)
        progress(None, desc=(f"Downloading {str(name).strip()} from the model hub, then loading it" if source == "hub"
                             else f"Loading {str(name).strip()}"))
        if source == "demo" and DEMO_MODELS.get(name, {}).get("on_request") and not demo_model_installed(name):
            progress(None, desc=f"Installing {name} once ({DEMO_MODELS[name]['download_mb']} MB download, then a "
                                "conversion of a few minutes)")
        full = None if session.model is not None else store.admission_problem(getattr(request, "session_hash", None))
        reply = H.Reply(False, full) if full else H.load(session, source, name, device, access=access,
                                                          progress=_gradio_progress(progress))
        if reply.ok:  # only a loaded model makes (and keeps) a session in the store
            store.adopt(session)
        else:  # the session keeps whatever it had loaded before
            return (_status(reply), H.architecture_markdown(session.arch), *[gr.update()] * 13)
        defaults = CLASSIFIER_DEFAULTS if session.encoder else DECODER_DEFAULTS
        empty = F.empty_figure()
        choices = list(BUILTIN_SETS) if session.encoder else list(H.DECODER_SOURCES)
        recipe = resolve_recipe(session.model, session.tokenizer)  # the default follows the model
        value = defaults["builtin"] if session.encoder else recipe.source
        return (_status(reply), H.architecture_markdown(session.arch),
                gr.update(choices=choices, value=value),
                gr.update(value=defaults["num_samples"]), gr.update(value=defaults["seq_len"]),
                empty, empty, empty, empty, "",
                estimate_sentence(session.model, defaults["num_samples"], defaults["seq_len"]),
                gr.update(value=recipe.sensitivity_labels), gr.update(value=recipe.correct_on or H.SAME_TEXT),
                recipe_note(recipe), store.token_for(session.key))

    def on_sizes(num_samples, seq_len, request: gr.Request):
        session = session_of(request)
        if session is None or session.model is None:
            return ""
        return estimate_sentence(session.model, num_samples, seq_len)

    def on_prune(calib_source, builtin, upload, pasted, num_samples, seq_len, sparsity, budget_kind, uniform, mode,
                 method, layer_choice, recover_on, recover_steps, settings, sensitivity="data", correct_on=H.SAME_TEXT,
                 request: gr.Request = None, progress=gr.Progress()):
        session = session_of(request)
        try:
            fraction = _percent(sparsity)
        except ValueError as exc:
            return (f"{WARN} {exc}", *[gr.update()] * n_plan, gr.update(), gr.update(value=_slider_value(session)))
        event = session.begin_job()
        reply = H.calibrate_and_prune(
            session, dict(source=calib_source, builtin=builtin, file_path=upload, pasted=pasted,
                          num_samples=num_samples, seq_len=seq_len, sensitivity_labels=sensitivity or "data",
                          correct_on=correct_on or H.SAME_TEXT),
            dict(sparsity=fraction, budget_kind=budget_kind, uniform=uniform, mode=mode, method=method or "stat",
                 recover_steps=recover_steps if recover_on else 0, settings=settings, cut=False),
            progress=_gradio_progress(progress), cancel_event=event)
        installed = reply.ok or reply.data.get("plan") is not None   # (a cancelled recovery keeps its prune)
        return (_status(reply), *_plan_outputs(session, layer_choice), None if installed else gr.update(),
                gr.update())

    def on_cut(current, request: gr.Request):
        """After the plan's figures are shown: cut the pruned copy (seconds), so Compare and Export
        start at once; the status line says when it is ready."""
        session = session_of(request)
        if session is None or not current or current.startswith(WARN):
            return gr.update()
        event = session.begin_job()
        reply = H.cut_copy(session, cancel_event=event)
        if not reply.ok:
            return _status(reply)
        return f"{current} {reply.message}" if reply.message else gr.update()

    def on_tab_statuses(request: gr.Request):
        return H.tab_statuses(session_of(request))

    def on_method(method):
        """The settings box names the chosen method's settings and starts empty (its defaults); the
        chosen method's typed controls are shown, at their defaults."""
        method = method or "stat"
        shown = [gr.update(visible=name == method) for name in setting_controls]
        defaults = [gr.update(value=f.default) for name in setting_controls for f in H.setting_fields(name)]
        return (gr.update(value="", info=H.settings_help(method)), *shown, *defaults)

    def setting_control(field):
        """One typed control for one field of a method's settings dataclass (as the CLI makes one flag)."""
        kind, choices = H.setting_kind(field), H.setting_choices(field)
        if kind is bool:
            return gr.Checkbox(value=field.default, label=field.name, min_width=140)
        if choices:
            return gr.Dropdown(list(choices), value=field.default, label=field.name, min_width=140)
        if kind in (int, float):
            return gr.Number(value=field.default, label=field.name, precision=0 if kind is int else None,
                             min_width=140)
        return gr.Textbox(value="" if field.default is None else str(field.default), label=field.name, min_width=140)

    def on_rebudget(sparsity, budget_kind, uniform, mode, method, layer_choice, recover_on, settings,
                    request: gr.Request):
        session = session_of(request)
        try:
            fraction = _percent(sparsity)
        except ValueError as exc:   # the slider goes back to the plan's value; nothing else changes
            return (f"{WARN} {exc}", *[gr.update()] * n_plan, gr.update(), gr.update(value=_slider_value(session)))
        if session.calibration is None:
            return ("Calibrate and prune once; after that the slider re-plans instantly.",
                    *_plan_outputs(session, layer_choice), gr.update(), gr.update())
        if mode != "one-shot":
            return ("Re-budgeting from cached statistics is one-shot only; press Prune to run propagate mode.",
                    *[gr.update()] * n_plan, gr.update(), gr.update())
        # Slider moves arrive faster than plans on a real model, two may run at once, and the one
        # finishing last is shown: one plan at a time per session, and a request that a newer one
        # superseded while it waited computes nothing, so the last value moved to is the one shown.
        seq = session.next_rebudget()
        with session.rebudget_lock:
            if seq != session.rebudget_seq:
                return (*[gr.update()] * (n_plan + 3),)
            reply = H.replan(session, fraction, budget_kind, uniform, method or "stat", settings)
        note = " Recovery runs with Calibrate & prune, not on a re-budget." if reply.ok and recover_on else ""
        return (_status(reply) + note, *_plan_outputs(session, layer_choice), None if reply.ok else gr.update(),
                gr.update())

    def on_layer(choice, request: gr.Request):
        session = session_of(request)
        return _decay(session.plan, choice), _spectrum(H.plan_explanations(session), choice)

    def on_head(layer, head, text, request: gr.Request):
        reply = H.head_view(session_of(request), layer, head, text)
        if not reply.ok:
            return _status(reply), F.empty_figure(reply.message), ""
        return f"{OK} Attention pattern drawn.", F.attention_figure(reply["pattern"], reply["details"]), reply.message

    def on_learn(layer, prompt, request: gr.Request):
        reply = H.lesson(session_of(request), layer, prompt)
        if not reply.ok:
            return (_status(reply), *[gr.update()] * 12)
        d = reply.data
        texts = [F.lesson_text(i + 1, d[k]) for i, k in enumerate(H.LESSON_STEPS)]
        return (_status(reply), texts[0], F.lesson_activations(d["activations"], d["layer"]),
                texts[1], F.lesson_spectrum(d["spectrum"], d["layer"]),
                texts[2], F.lesson_selection(d["selection"], d["layer"]),
                texts[3], F.lesson_correction(d["correction"], d["layer"]),
                texts[4], F.lesson_allocation(d["allocation"], d["layer"]),
                texts[5], F.lesson_effect_html(d["effect"]))

    def on_measure(eval_tokens, request: gr.Request):
        session = session_of(request)
        reply = H.measure(session, int(eval_tokens), cancel_event=session.begin_job())
        if not reply.ok:
            return _status(reply), gr.update()
        return _status(reply), pd.DataFrame(reply["rows"], columns=H.METRIC_HEADERS)

    def on_generate(prompt, max_new_tokens, request: gr.Request):
        reply = H.generate(session_of(request), prompt, max_new_tokens)
        return _status(reply), reply.data.get("before", ""), reply.data.get("after", "")

    def on_compare(sparsity, budget_kind, uniform, eval_tokens, methods, suite, request: gr.Request,
                   progress=gr.Progress()):
        session = session_of(request)
        try:
            fraction = _percent(sparsity)
        except ValueError as exc:
            return f"{WARN} {exc}", gr.update(), gr.update()
        reply = H.compare(session, fraction, budget_kind, uniform, int(eval_tokens), methods=methods,
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

    def on_report(request: gr.Request):
        reply = H.report_html(session_of(request))
        if not reply.ok:
            return _status(reply), None
        return _status(reply), reply["path"]

    def on_cancel(request: gr.Request):
        session = session_of(request)
        session.cancel()
        return "⏹ Cancelled; the loaded (dense) model is unchanged."

    def on_unload(request: gr.Request):
        store.detach(getattr(request, "session_hash", None))  # kept a while for a reload to take back

    def on_page_open(token, request: gr.Request):
        """A reloaded page (same browser, its token in local storage) takes its session back: the model,
        the calibration and the plan, with the figures and the slider as they were."""
        key = getattr(request, "session_hash", None)
        session = store.resume(token, key)
        if session is None or session.model is None:
            return (gr.update(), gr.update(), *[gr.update()] * n_plan, gr.update(), None if token else gr.update())
        plan = session.plan
        message = (f"{OK} Restored your session: {session.model_name} is loaded"
                   + (", its calibration is cached" if session.calibration is not None else "")
                   + (f", and the plan removes {session.report['block_params_removed_fraction']:.1%} of block "
                      "parameters." if plan is not None else "."))
        return (message, H.architecture_markdown(session.arch), *_plan_outputs(session),
                gr.update(value=_slider_value(session)), token)

    def status_box(elem_id: str, value: str = "") -> gr.Textbox:
        return gr.Textbox(label="status", value=value, interactive=False, elem_id=elem_id,
                          elem_classes=["stat-status"], max_lines=3)

    # --- layout: five tabs; each has its own status line at its top -------------------------------
    with gr.Blocks(title="STAT workbench", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Prune", id="prune", elem_id="tab_prune"):
                status = status_box("status", "Load a model to start.")
                # this browser's resume token (local storage): a reload takes the session back
                resume_token = gr.BrowserState(None, storage_key="stat_workbench_session")
                with gr.Row():
                    with gr.Column(scale=1):
                        with gr.Row():
                            source = gr.Radio(["demo", "folder", "hub"], value="demo", label="source")
                            device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="device")
                        demo_name = gr.Dropdown(demo_model_choices(), value="smollm2-135m", label="demo model",
                                                info="; ".join(f"{k}: {v['description']}" for k, v in DEMO_MODELS.items()))
                        path = gr.Textbox(label="local folder or hub id", placeholder="/path/to/model or org/name")
                        load_btn = gr.Button("Load model", variant="primary", elem_id="load_btn")
                    with gr.Column(scale=1):
                        arch = gr.Markdown(H.architecture_markdown({}), elem_id="arch")
                with gr.Row():
                    sparsity = gr.Slider(0, 90, value=30, step=1, label="remove % of block parameters / FLOPs",
                                         elem_id="sparsity", scale=3)
                    budget_kind = gr.Radio(["params", "flops"], value="params", label="budget counts", scale=1)
                    method = gr.Dropdown(H.plan_method_choices(), value="stat", label="method", elem_id="method",
                                         info="STAT, a published peer or a baseline (SliceGPT: in Compare only)",
                                         scale=2)
                method_settings = gr.Textbox(value="", label="method settings (name=value, comma-separated; empty: "
                                                             "the defaults)",
                                             info=H.settings_help("stat"), placeholder="e.g. output_prior=true",
                                             elem_id="method_settings", max_lines=2)
                # the chosen method's settings as controls built from its settings dataclass's field types;
                # they write the text above (which the CLI's --<method>-<field> flags mirror)
                setting_groups, setting_controls = {}, {}
                for _, name in H.plan_method_choices():
                    if H.setting_fields(name):
                        with gr.Row(visible=name == OWN_METHOD, elem_id=f"settings_{name}") as group:
                            setting_controls[name] = [setting_control(f) for f in H.setting_fields(name)]
                        setting_groups[name] = group
                with gr.Row():
                    prune_btn = gr.Button("Calibrate & prune", variant="primary", elem_id="prune_btn", scale=3)
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel_btn", scale=1)
                estimate = gr.Markdown(elem_id="estimate")
                summary = gr.Markdown(elem_id="summary")
                gr.Markdown(RELOAD_NOTE, elem_id="reload_note")
                with gr.Accordion("Calibration text, mode and recovery", open=True):
                    recipe_md = gr.Markdown(recipe_note(DEMO_RECIPE), elem_id="recipe_note")
                    with gr.Row():
                        calib_source = gr.Radio(["builtin", "file", "pasted"], value="builtin", label="calibrate on")
                        builtin = gr.Dropdown(list(H.DECODER_SOURCES), value=DEMO_RECIPE.source, label="built-in text",
                                              info="decoders: mix = Wikipedia + the model's own chat answers "
                                                   "(generated once, cached), wikipedia, in-context, "
                                                   "self-generated; classifiers: labelled sets")
                        # no minimum/maximum here: the handlers answer a bad size with one sentence
                        num_samples = gr.Number(value=64, precision=0, label="samples", elem_id="num_samples")
                        seq_len = gr.Number(value=512, precision=0, label="sequence length (tokens)", elem_id="seq_len")
                    with gr.Row():
                        upload = gr.File(label="or upload: .txt / .json / .jsonl / .csv / .parquet (classifiers: "
                                               "text + label columns)",
                                         file_types=[".txt", ".json", ".jsonl", ".csv", ".parquet"], type="filepath")
                        pasted = gr.Textbox(label="or paste text", lines=4)
                    with gr.Row():
                        sensitivity = gr.Radio(list(H.SENSITIVITY_LABELS), value=DEMO_RECIPE.sensitivity_labels,
                                               label="sensitivity labels",
                                               info="model: the gradient pass on the model's own answers (its "
                                                    "Fisher) instead of the text's next tokens",
                                               elem_id="sensitivity")
                        correct_on = gr.Dropdown([H.SAME_TEXT, *H.DECODER_SOURCES],
                                                 value=DEMO_RECIPE.correct_on or H.SAME_TEXT,
                                                 label="fit corrections on",
                                                 info="decoders: units chosen on the text above, corrections fitted "
                                                      "on this one. Chat models keep few-shot, analogy and chat "
                                                      "answers best with mix + model + wikipedia (a little higher "
                                                      "perplexity)", elem_id="correct_on")
                    with gr.Row():
                        uniform = gr.Checkbox(False, label="uniform layers (same counts everywhere; stock-loadable "
                                                           "export)")
                        mode = gr.Radio(["one-shot", "propagate"], value="one-shot", label="mode",
                                        info="propagate re-calibrates each layer on the pruned ones (slower, no "
                                             "instant re-budget)")
                    with gr.Row():
                        recover_on = gr.Checkbox(False, label="recover after pruning (short distillation towards "
                                                              "the dense model)",
                                                 info="KL on the output distributions + block-output MSE on the "
                                                      "calibration text; shapes unchanged; as stat-prune --recover "
                                                      "STEPS", elem_id="recover_on", scale=3)
                        recover_steps = gr.Number(value=100, precision=0, label="recovery steps",
                                                  elem_id="recover_steps", scale=1)

            with gr.Tab("Inspect", id="inspect", elem_id="tab_inspect"):
                status_inspect = status_box("status_inspect", "Prune a model, then inspect what went and why.")
                with gr.Row():
                    with gr.Column(scale=3):
                        heads_plot = gr.Plot(label="layers × heads", elem_id="heads_plot")
                        gr.Markdown(F.HEADS_CAPTION + " Click a square to open that head in the head explorer.")
                    with gr.Column(scale=2, elem_id="head_explorer"):
                        gr.Markdown("### Head explorer\nClick a head in the heatmap, or type its layer and number.")
                        with gr.Row():
                            head_layer = gr.Number(value=0, precision=0, label="layer", elem_id="head_layer")
                            head_index = gr.Number(value=0, precision=0, label="head", elem_id="head_index")
                        head_text = gr.Textbox(value="The cat sat on the mat because it was tired, so the dog slept.",
                                               label="sample text")
                        head_btn = gr.Button("Show this head", elem_id="head_btn")
                        head_info = gr.Markdown(elem_id="head_info")
                head_plot = gr.Plot(label="attention pattern", elem_id="head_plot")
                gr.Markdown(F.HEAD_CAPTION)
                neurons_plot = gr.Plot(label="layers × neurons", elem_id="neurons_plot")
                gr.Markdown(F.NEURON_CAPTION)
                layer_pick = gr.Dropdown(["all layers"], value="all layers",
                                         label="singular values and decay curves for", elem_id="layer_pick")
                spectrum_plot = gr.Plot(label="singular-value decay", elem_id="spectrum_plot")
                gr.Markdown(F.SPECTRUM_CAPTION + " " + F.SPECTRUM_ALL_CAPTION)
                decay_plot = gr.Plot(label="decay curves", elem_id="decay_plot")
                gr.Markdown(F.DECAY_CAPTION)

            with gr.Tab("Learn", id="learn", elem_id="tab_learn"):
                status_learn = status_box("status_learn", "Prune a model, pick a layer and press Explain.")
                gr.Markdown(LEARN_INTRO)
                with gr.Row():
                    learn_layer = gr.Dropdown([], label="layer", elem_id="learn_layer", scale=1)
                    learn_prompt = gr.Textbox(value="The history of the city", label="prompt for step 6 (decoders)",
                                              scale=3)
                    learn_btn = gr.Button("Explain this layer", variant="primary", elem_id="learn_btn", scale=1)
                learn_outputs = []
                for i, name in enumerate(("The activation matrix", "Its singular values",
                                          "Choosing whole neurons: the interpolative decomposition",
                                          "The correction folded into the next matrix",
                                          "One budget across layers", "The effect on the model")):
                    gr.Markdown(f"### {i + 1} · {name}")
                    text = gr.Markdown(elem_id=f"learn_text_{i + 1}")
                    view = (gr.HTML(elem_id="learn_effect") if i == 5
                            else gr.Plot(label=name, elem_id=f"learn_plot_{i + 1}"))
                    learn_outputs += [text, view]

            with gr.Tab("Compare", id="compare", elem_id="tab_compare"):
                status_compare = status_box("status_compare", "Measure the pruned model, or compare methods at the "
                                                              "Prune tab's budget.")
                gr.Markdown("### Before / after")
                with gr.Row():
                    eval_tokens = gr.Slider(512, 16384, value=H.QUICK_EVAL_TOKENS, step=512,
                                            label="perplexity eval tokens (quick estimate; the protocol uses 16,384)")
                    measure_btn = gr.Button("Measure before / after", elem_id="measure_btn")
                metrics = gr.Dataframe(headers=H.METRIC_HEADERS, label="before / after", interactive=False,
                                       elem_id="metrics", wrap=True)
                with gr.Row():
                    prompt = gr.Textbox(value="The history of the city", label="prompt (decoders)", scale=3)
                    max_new = gr.Number(value=40, precision=0, label="new tokens", scale=1)
                    gen_btn = gr.Button("Generate with both", scale=1)
                with gr.Row():
                    gen_before = gr.Textbox(label="dense model", lines=4, interactive=False)
                    gen_after = gr.Textbox(label="pruned model", lines=4, interactive=False)
                gr.Markdown("### Methods at the same budget")
                compare_methods = gr.CheckboxGroup(choices=H.method_choices(), value=list(H.COMPARE_METHODS),
                                                   label="methods (STAT, the published peers, simple baselines; "
                                                         "SliceGPT runs its own pass over the calibration text)",
                                                   elem_id="compare_methods")
                compare_suite = gr.Checkbox(value=False, elem_id="compare_suite",
                                            label="also run the evaluation suite on each (decoders: few-shot "
                                                  "sentiment, analogies, chat agreement with the dense model; "
                                                  "SmolLM2 on 2 CPU cores: about 2 min once for the dense "
                                                  "reference, then about 1 min per method)")
                compare_btn = gr.Button("Compare the chosen methods at this budget", elem_id="compare_btn")
                # the method column stays put while the others scroll; headers wrap
                compare_table = gr.Dataframe(headers=["method", "removed", "quality", "vs dense", "KL to dense"],
                                             interactive=False, wrap=True, pinned_columns=1, elem_id="compare_table")
                compare_plot = gr.Plot(label="comparison")
                gr.Markdown(F.COMPARE_CAPTION)

            with gr.Tab("Export", id="export", elem_id="tab_export"):
                status_export = status_box("status_export", "Prune a model, then export it or write a report.")
                with gr.Row():
                    export_format = gr.Dropdown(list(H.EXPORT_CHOICES), value=next(iter(H.EXPORT_CHOICES)),
                                                label="format (GGUF: Llama-family decoders; ONNX: logits only)",
                                                elem_id="export_format")
                    export_btn = gr.Button("Export pruned model (zip)", elem_id="export_btn")
                with gr.Row():
                    export_zip = gr.File(label="pruned model folder (zip)", interactive=False, elem_id="export_zip")
                    export_report = gr.File(label="pruning report (JSON)", interactive=False, elem_id="export_report")
                gr.Markdown("### A report to hand out\nOne HTML file: the configuration, the heatmaps, the decay and "
                            "singular-value views, before / after and the last comparison (when measured), the "
                            "plan. Interactive figures; it opens offline (plotly.js is inside the file).")
                with gr.Row():
                    report_btn = gr.Button("Write the HTML report", elem_id="report_btn")
                    report_file = gr.File(label="report (HTML)", interactive=False, elem_id="report_file")

        # --- events -----------------------------------------------------------------------------
        heavy = dict(concurrency_limit=1, concurrency_id="device")
        plan_outputs = [heads_plot, neurons_plot, decay_plot, spectrum_plot, layer_pick, summary, learn_layer]
        load_evt = load_btn.click(on_load, [source, demo_name, path, device],
                                  [status, arch, builtin, num_samples, seq_len, heads_plot, neurons_plot, decay_plot,
                                   spectrum_plot, summary, estimate, sensitivity, correct_on, recipe_md, resume_token],
                                  api_name="load", **heavy)
        for box in (num_samples, seq_len):
            box.change(on_sizes, [num_samples, seq_len], [estimate], api_name=False, show_progress="hidden")
        prune_evt = prune_btn.click(on_prune, [calib_source, builtin, upload, pasted, num_samples, seq_len, sparsity,
                                               budget_kind, uniform, mode, method, layer_pick, recover_on,
                                               recover_steps, method_settings, sensitivity, correct_on],
                                    [status, *plan_outputs, metrics, sparsity], api_name="prune", **heavy)
        rebudget_inputs = [sparsity, budget_kind, uniform, mode, method, layer_pick, recover_on, method_settings]
        # re-planning reads cached statistics only (well under a second): it stays out of the device
        # queue, so the slider responds while another user's job holds the device
        light = dict(concurrency_limit=2, concurrency_id="plans")
        # .input fires while dragging and on a typed value; "always_last" drops superseded requests
        rebudget_evts = [sparsity.input(on_rebudget, rebudget_inputs, [status, *plan_outputs, metrics, sparsity],
                                        api_name="rebudget", trigger_mode="always_last", show_progress="minimal",
                                        **light)]
        for control in (budget_kind, uniform):
            rebudget_evts.append(control.input(on_rebudget, rebudget_inputs, [status, *plan_outputs, metrics, sparsity],
                                               api_name=False, **light))
        # another method: its settings box first (emptied, its fields named), then the re-plan
        every_control = [c for controls in setting_controls.values() for c in controls]
        rebudget_evts.append(method.input(on_method, [method],
                                          [method_settings, *setting_groups.values(), *every_control],
                                          api_name=False, show_progress="hidden")
                             .then(on_rebudget, rebudget_inputs, [status, *plan_outputs, metrics, sparsity],
                                   api_name=False, **light))
        for name, controls in setting_controls.items():
            def settings_from_controls(*values, name=name):
                return H.settings_text(name, {f.name: v for f, v in zip(H.setting_fields(name), values)})

            for control in controls:  # a changed control: its method's settings text, then the re-plan
                rebudget_evts.append(control.input(settings_from_controls, controls, [method_settings], api_name=False,
                                                   show_progress="hidden")
                                     .then(on_rebudget, rebudget_inputs, [status, *plan_outputs, metrics, sparsity],
                                           api_name=False, **light))
        rebudget_evts.append(method_settings.submit(on_rebudget, rebudget_inputs,
                                                    [status, *plan_outputs, metrics, sparsity], api_name=False,
                                                    **light))
        # the figures first, then the pruned copy (the Inspect tab needs only the plan)
        cut_evt = prune_evt.then(on_cut, [status], [status], api_name=False, show_progress="hidden",
                                 concurrency_limit=1, concurrency_id="device")
        # the other tabs' status lines follow the plan shown (not the message of before the prune)
        tab_status_outputs = [status_inspect, status_learn, status_compare, status_export]
        for evt in (load_evt, prune_evt, *rebudget_evts):
            evt.then(on_tab_statuses, None, tab_status_outputs, api_name=False, show_progress="hidden")
        layer_pick.input(on_layer, [layer_pick], [decay_plot, spectrum_plot], api_name="decay", show_progress="hidden")
        head_evt = head_btn.click(on_head, [head_layer, head_index, head_text], [status_inspect, head_plot, head_info],
                                  api_name="head", **heavy)
        learn_evt = learn_btn.click(on_learn, [learn_layer, learn_prompt], [status_learn, *learn_outputs],
                                    api_name="learn", **heavy)
        measure_evt = measure_btn.click(on_measure, [eval_tokens], [status_compare, metrics], api_name="measure",
                                        **heavy)
        gen_evt = gen_btn.click(on_generate, [prompt, max_new], [status_compare, gen_before, gen_after],
                                api_name="generate", **heavy)
        compare_evt = compare_btn.click(on_compare,
                                        [sparsity, budget_kind, uniform, eval_tokens, compare_methods, compare_suite],
                                        [status_compare, compare_table, compare_plot], api_name="compare", **heavy)
        export_evt = export_btn.click(on_export, [export_format], [status_export, export_zip, export_report],
                                      api_name="export", **heavy)
        report_evt = report_btn.click(on_report, None, [status_export, report_file], api_name="report", **heavy)
        cancel_btn.click(on_cancel, None, [status], api_name="cancel",
                         cancels=[load_evt, prune_evt, cut_evt, measure_evt, gen_evt, compare_evt, head_evt,
                                  export_evt, learn_evt, report_evt, *rebudget_evts])
        demo.load(None, js=HEATMAP_CLICK_JS)
        page_evt = demo.load(on_page_open, [resume_token], [status, arch, *plan_outputs, sparsity, resume_token],
                             api_name=False, show_progress="hidden")
        page_evt.then(on_tab_statuses, None, tab_status_outputs, api_name=False, show_progress="hidden")
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


def warm_imports() -> None:
    """Import what loading the demo models needs before the page is served: transformers imports its
    model, config and tokenizer modules lazily, which took most of the first Load model's 3–4 s on a
    2-core machine (0.7 s after this)."""
    import transformers

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "LlamaConfig", "LlamaForCausalLM",
                 "BertConfig", "BertForSequenceClassification", "PreTrainedTokenizerFast"):
        getattr(transformers, name)


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
    warm_imports()
    demo = build_demo(SessionStore(max_sessions=args.max_sessions), access)
    try:
        launch(demo, host, args.port)
    except KeyboardInterrupt:  # a signal before Gradio's own handler was reached (e.g. during startup)
        log.info("stopped")
        demo.close()


if __name__ == "__main__":
    main()
