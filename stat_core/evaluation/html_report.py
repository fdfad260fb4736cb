"""One self-contained HTML file to hand out after a prune (``stat-prune … --report-html FILE``, the
app's *Report* button): the configuration, the heads heatmap, neurons by importance, the decay and
singular-value views, before / after (and the evaluation suite or a comparison when measured) and
the plan, layer by layer.

The figures are the app's (:mod:`stat_core.evaluation.figures`), interactive, with plotly.js
embedded once inline: the file opens offline and fetches nothing.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from stat_core.evaluation import figures as FIG

#: Report fields shown as "before → after" when present (field stem, label, format).
MEASURES = (("perplexity", "perplexity", "{:.2f}"), ("accuracy", "held-out accuracy", "{:.1%}"),
            ("kl_to_dense", "KL to dense (nats)", "{:.4f}"), ("fewshot_accuracy", "few-shot accuracy", "{:.1%}"),
            ("fewshot_bias_free", "few-shot AUC", "{:.3f}"), ("fewshot_majority_share", "one-label share", "{:.0%}"),
            ("analogy_accuracy", "analogies", "{:.1%}"), ("instruction_agreement", "chat agreement", "{:.1%}"),
            ("instruction_kl", "chat KL", "{:.3f}"))

CSS = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#212529}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #dee2e6;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #dee2e6;padding:.25em .6em;text-align:left}
th{background:#f1f3f5}.caption{color:#495057;font-size:.9em;max-width:60em}.figure{margin:1em 0}
.scroll{max-height:30em;overflow:auto}
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(x) -> str:
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return f"{x:,}" if isinstance(x, int) else str(x)


def configuration_rows(report: dict) -> list[list[str]]:
    """The configuration and the sizes, from the pruning report."""
    rows = [["model", report.get("model", "")], ["method", report.get("method", "")],
            ["mode", report.get("mode", "")],
            ["target", f"{report.get('sparsity_target', 0):.0%} of block "
                       f"{'parameters' if report.get('budget_kind') == 'params' else 'FLOPs'}"
                       + (" (uniform layers)" if report.get("uniform") else "")]]
    calib = report.get("calibration") or {}
    if calib:
        what = ", ".join(f"{k} {_num(v)}" for k, v in calib.items()
                         if k in ("source", "builtin", "num_samples", "seq_len", "tokens") and v is not None)
        rows.append(["calibration", what])
    for key, label in (("block_params_removed_fraction", "block parameters removed"),
                       ("block_flops_removed_fraction", "block FLOPs removed")):
        if report.get(key) is not None:
            rows.append([label, f"{report[key]:.1%}"])
    if "params_before" in report and "params_after" in report:
        rows.append(["parameters", f"{_num(report['params_before'])} → {_num(report['params_after'])}"])
    if "block_macs_per_token_before" in report and "block_macs_per_token_after" in report:
        rows.append(["block FLOPs / token (MACs)", f"{_num(report['block_macs_per_token_before'])} → "
                                                    f"{_num(report['block_macs_per_token_after'])}"])
    if "recover" in report:
        rows.append(["recovery", f"{report['recover'].get('steps')} steps"])
    rows.append(["device / dtype", f"{report.get('device', '')} / {report.get('dtype', '')}"])
    return rows


def measure_rows(report: dict) -> list[list[str]]:
    """Before → after of every measure the report holds (quality, KL, the suite)."""
    rows = []
    for key, label, fmt in MEASURES:
        after = report.get(f"{key}_after")
        if after is None:
            continue
        before = report.get(f"{key}_before")
        rows.append([label, "" if before is None else fmt.format(before), fmt.format(after)])
    return rows


def plan_rows(plan) -> list[list]:
    return [[lp.layer, f"{len(lp.kept_heads)}/{lp.num_heads}", f"{len(lp.kept_kv_heads)}/{lp.num_kv_heads}",
             f"{len(lp.kept_neurons):,}/{lp.intermediate_size:,}",
             " ".join(str(h) for h in lp.kept_heads) or "none"] for lp in plan.layers]


def report_html(plan, report: dict, explanations: dict | None = None, reasons: list | None = None,
                measures: tuple[list[str], list[list]] | None = None,
                comparison: tuple[list[str], list[list]] | None = None, title: str | None = None) -> str:
    """The report as one HTML string. ``explanations``: :func:`stat_core.methods.stat.explain.plan_explanations`
    (adds neurons by importance and the singular-value view); ``reasons``: :func:`~stat_core.methods.stat.explain.head_reasons`
    (the heatmap's hover says why); ``measures`` / ``comparison``: ``(headers, rows)`` tables measured
    elsewhere (the app's before / after and Compare tables); without ``measures`` the report's own
    before / after fields are shown."""
    figures: list[tuple[str, object, str]] = [("Attention heads", FIG.head_heatmap(plan, reasons), FIG.HEADS_CAPTION)]
    if explanations:
        figures.append(("MLP neurons", FIG.neuron_profile(plan, explanations["importance"], explanations["massive"]),
                        FIG.NEURON_CAPTION))
    if any(lp.mlp_damage for lp in plan.layers):
        figures.append(("Decay curves", FIG.decay_curves(plan, None), FIG.DECAY_CAPTION))
    if explanations:
        figures.append(("Singular-value view", FIG.spectrum_figure(explanations["spectra"], None),
                        FIG.SPECTRUM_ALL_CAPTION))
    parts = []
    for i, (name, fig, caption) in enumerate(figures):
        div = fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False,
                          config={"displaylogo": False, "responsive": True})
        parts.append(f"<h2>{_esc(name)}</h2><div class='figure'>{div}</div><p class='caption'>{_esc(caption)}</p>")
    if measures is not None:
        before_after = _table(*measures)
    else:
        rows = measure_rows(report)
        before_after = _table(["measure", "dense", "pruned"], rows) if rows else "<p>Not measured.</p>"
    compare = "" if comparison is None else f"<h2>Methods at the same budget</h2>{_table(*comparison)}"
    plan_json = json.dumps(plan.to_dict()).replace("</", "<\\/")   # safe inside a script element
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = title or f"STAT pruning report: {report.get('model', '')}"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{GENERATOR}<title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>"
            f"<p class='caption'>Written {stamp} by stat-prune. Figures are interactive (hover, zoom) and work "
            "offline: nothing is fetched.</p>"
            f"<h2>Configuration</h2>{_table(['', ''], configuration_rows(report))}"
            f"<h2>Before / after</h2>{before_after}{compare}{''.join(parts)}"
            f"<h2>The plan, layer by layer</h2><div class='scroll'>"
            f"{_table(['layer', 'heads kept', 'KV heads kept', 'neurons kept', 'kept heads'], plan_rows(plan))}</div>"
            f"<script type='application/json' id='plan-json'>{plan_json}</script>"
            "</body></html>")


#: Marks a report this tool wrote: only such a file is ever replaced by a new report.
GENERATOR = "<meta name='generator' content='stat-workbench report'>"


def is_our_report(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return GENERATOR.encode() in f.read(4096)
    except OSError:
        return False


def check_report_path(path, protect: tuple = ()) -> Path:
    """``path`` as a Path, or ValueError with one sentence, before any work: a folder, a folder that does
    not exist or cannot be written, an existing file that is not a report this tool wrote (a model's
    weights, anyone's page), or a path inside one of the ``protect`` folders (the model being pruned,
    the export being written)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name for the HTML report, e.g. {path / 'report.html'}.")
    if not path.parent.is_dir():
        raise ValueError(f"The folder {path.parent} does not exist; create it or give another path for the report.")
    resolved = path.resolve()
    for folder in protect:
        if folder is None:
            continue
        folder = Path(folder).expanduser().resolve()
        if folder.is_dir() and (resolved == folder or folder in resolved.parents):
            raise ValueError(f"The report path {path} is inside {folder}, which this run reads or writes; "
                             "give a path outside it.")
    if path.exists() and not is_our_report(path):
        raise ValueError(f"{path} exists and is not a report this tool wrote; give a new file name (nothing "
                         "is overwritten but an earlier report).")
    try:  # a read-only place fails now, not after the whole prune
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"Cannot write the report in {path.parent}: {exc.strerror or exc}; give another path.") from None
    return path


def write_report_html(path, plan, report: dict, **kwargs) -> Path:
    """:func:`report_html` written to ``path`` (atomically: a temporary file renamed into place)."""
    path = check_report_path(path)
    text = report_html(plan, report, **kwargs)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
