"""One report for every prune, whoever runs it (the CLI, the app, the Python API): what was asked,
what the calibration was, sizes before and after, timings. Every export's ``pruning_report.json``
and model card are written from it, so a CLI export and an app export carry the same fields.

Quality is added by whoever measures it, as ``<metric>_before`` / ``<metric>_after`` pairs (the
model card lists every such pair). ``size_on_disk_after_bytes`` is the planned size (parameters ×
bytes per weight) until an export replaces it with the bytes actually written.
"""

from __future__ import annotations

import dataclasses

from stat_core.adapters import get_adapter
from stat_core.evaluation.perplexity import count_parameters
from stat_core.export.common import state_dict_bytes
from stat_core.surgery.budget import block_geometry, budget_summary


def size_summary(model, seq_len: int) -> dict:
    """``params``, ``block_params``, ``block_macs_per_token`` (at ``seq_len``) and ``bytes`` (unique
    weight storage, what safetensors holds) of ``model`` as it is now."""
    s = budget_summary(model, seq_len)
    return {"params": count_parameters(model), "block_params": s["block_params"],
            "block_macs_per_token": s["block_macs_per_token"], "bytes": state_dict_bytes(model)}


def architecture_summary(model) -> dict:
    """What a loaded model is: family, kind, layers, widths (first layer), parameters, device, dtype."""
    adapter = get_adapter(model)
    first = adapter.layer_shape(0)
    p = next(model.parameters())
    return {"family": str(model.config.model_type), "kind": "decoder" if adapter.is_decoder else "classifier",
            "layers": adapter.num_layers, "hidden": adapter.hidden_size,
            "heads": first.num_heads, "kv_heads": first.num_kv_heads, "head_dim": adapter.head_dim,
            "mlp_width": first.intermediate_size, "parameters": count_parameters(model),
            "device": str(p.device), "dtype": str(p.dtype).replace("torch.", "")}


def plan_sizes(model, plan, seq_len: int) -> dict:
    """The same numbers for the dense ``model`` once cut to ``plan`` (from the layers' geometry; no
    surgery needed, so a re-budget can show them at once)."""
    adapter = get_adapter(model)
    block_params, macs = 0, 0.0
    for lp in plan.layers:
        geo = block_geometry(adapter, lp.layer)
        n_h, n_kv, k = len(lp.kept_heads), len(lp.kept_kv_heads), len(lp.kept_neurons)
        block_params += geo.attn_params(n_h, n_kv) + geo.mlp_params(k)
        macs += geo.attn_macs(n_h, n_kv, seq_len, adapter.is_decoder) + geo.mlp_macs(k)
    dense = size_summary(model, seq_len)
    params = dense["params"] - (dense["block_params"] - block_params)
    item = next(model.parameters()).element_size()
    return {"params": params, "block_params": block_params, "block_macs_per_token": macs,
            "bytes": dense["bytes"] - (dense["params"] - params) * item}


def prune_report(model_name: str, model, config, calibration_info: dict, before: dict, after: dict | None = None,
                 plan=None, **extra) -> dict:
    """The report of one prune of ``model`` (dense or pruned: only its kind, device and dtype are read)
    by ``config`` (a :class:`~stat_core.config.PruneConfig`), with ``before`` / ``after`` from
    :func:`size_summary` or :func:`plan_sizes` (``after=None``: not pruned yet). ``extra`` keys
    (timings, distributed, method_info, ...) are added as they are."""
    p = next(model.parameters())
    report = {
        "model": model_name, "kind": "decoder" if get_adapter(model).is_decoder else "encoder-classifier",
        "method": config.method, "mode": config.mode, "budget_kind": config.budget_kind,
        "sparsity_target": config.sparsity, "uniform": config.uniform, "flops_seq_len": config.flops_seq_len,
        "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
        "calibration_tokens": calibration_info.get("tokens"), "calibration": calibration_info,
        "params_before": before["params"], "block_params_before": before["block_params"],
        "block_macs_per_token_before": before["block_macs_per_token"], "size_on_disk_before_bytes": before["bytes"],
    }
    if getattr(config, "settings", None) is not None:  # the method's own settings, when given
        report["method_settings"] = dataclasses.asdict(config.settings)
    if after is not None:
        set_after_sizes(report, after)
    if plan is not None:
        report["predicted_damage"] = plan.budget.get("predicted_damage")
        report["layers"] = plan.kept_summary()
    report.update(extra)
    return report


def set_after_sizes(report: dict, after: dict) -> dict:
    """Fill the ``*_after`` sizes and the removed fractions from ``after`` (:func:`size_summary`,
    :func:`plan_sizes`, or a whole-model method's own counts without MACs)."""
    report["params_after"] = after["params"]
    report["block_params_after"] = after["block_params"]
    report["block_params_removed_fraction"] = 1 - after["block_params"] / report["block_params_before"]
    if after.get("block_macs_per_token") is not None:
        report["block_macs_per_token_after"] = after["block_macs_per_token"]
        report["block_flops_removed_fraction"] = 1 - after["block_macs_per_token"] / report["block_macs_per_token_before"]
    if after.get("bytes") is not None:
        report["size_on_disk_after_bytes"] = after["bytes"]
    return report


def removed_sentence(report: dict, verb: str = "Removed", seconds: float | None = None) -> str:
    """One sentence: how much of the block parameters (or FLOPs, for a FLOPs budget) a prune removes."""
    flops = report["budget_kind"] != "params"
    removed = report["block_flops_removed_fraction" if flops else "block_params_removed_fraction"]
    return (f"{verb} {removed:.1%} of the block {'FLOPs' if flops else 'parameters'} ({report['method']}, "
            f"{report['mode']}{', uniform' if report['uniform'] else ''})"
            + (f" in {seconds:.1f} s." if seconds is not None else "."))


def recovery_sentence(report: dict) -> str:
    """One sentence on the recovery recorded in ``report`` (empty if none ran)."""
    r = report.get("recover")
    if not r or not r.get("steps"):
        return ""
    return (f"Recovered for {r['steps']} steps in {r['seconds']:.1f} s (KL to dense during distillation "
            f"{r['kl_first']:.3g} → {r['kl_last']:.3g}).")
