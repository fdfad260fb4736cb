"""A lesson on the loaded model's own numbers: why STAT works, step by step, for one layer's MLP.

Every function returns plain data (lists, floats, sentences built from the numbers) for the app's
Learn view; nothing here draws. The steps:

1. :func:`activation_step` — the activation matrix ``Z`` (tokens × neurons) of the layer's MLP on a
   few calibration windows (a sample of it: the app draws it as a heatmap).
2. :func:`spectrum_step` — its singular values (from the calibration Gram, :mod:`explain`).
3. :func:`selection_step` — the interpolative decomposition keeps whole neurons: the energy left out
   keeping ``k`` neurons against the SVD's floor for the same ``k``.
4. :func:`correction_step` — the least-squares correction folded into the next matrix
   (``down_proj``): the MLP output error on held-out text with and without it.
5. :func:`allocation_step` — the budget across layers: kept fraction and the marginal damage at
   each layer's cut (why this layer keeps more or less than the others).
6. :func:`effect_step` — dense and pruned greedy continuations side by side, each pruned token
   with its KL divergence from the dense model's next-token distribution.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stat_core.adapters import get_adapter
from stat_core.calibration.statistics import CalibrationSet
from stat_core.linalg import ridge_of
from stat_core.methods.stat.explain import calibration_neuron_importance, calibration_spectra


def _pct(x: float) -> str:
    return f"{100 * x:.2g}%" if x < 0.01 else f"{x:.1%}"


@torch.no_grad()
def mlp_activations(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int) -> torch.Tensor:
    """The inputs of layer ``layer``'s MLP output projection (``Z``: real tokens × neurons, float64 CPU)."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    grabbed = []
    hook = adapter.mlp_out_proj(layer).register_forward_pre_hook(lambda m, args: grabbed.append(args[0].detach()))
    try:
        kwargs = {"input_ids": input_ids.to(device)}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device)
        model(**kwargs)
    finally:
        hook.remove()
    z = grabbed[0].to("cpu", torch.float64)
    z = z.reshape(-1, z.shape[-1])
    if attention_mask is not None:
        z = z[attention_mask.reshape(-1).bool()]
    return z


def _sample(calib_data, n_windows: int, n_tokens: int) -> CalibrationSet:
    data = CalibrationSet.wrap(calib_data)
    rows = data.take(slice(0, min(n_windows, len(data))))
    mask = rows.attention_mask[:, :n_tokens] if rows.attention_mask is not None else None
    return CalibrationSet(rows.input_ids[:, :n_tokens], mask, rows.labels)


def check_layer(plan, layer) -> int:
    try:
        layer = int(layer)
    except (TypeError, ValueError):
        raise ValueError("Pick a layer by number.") from None
    if not 0 <= layer < len(plan.layers):
        raise ValueError(f"The model has layers 0–{len(plan.layers) - 1}; pick one of those.")
    return layer


def activation_step(model, calibration, calib_data, plan, layer: int, n_tokens: int = 48,
                    n_neurons: int = 96) -> dict:
    """Step 1: a sample of ``Z`` (first ``n_tokens`` real tokens of the first calibration window;
    ``n_neurons`` neurons spread evenly over the importance order, most important left)."""
    sample = _sample(calib_data, 1, n_tokens)
    z = mlp_activations(model, sample.input_ids, sample.attention_mask, layer)
    energy = calibration_neuron_importance(model, calibration)[layer]
    order = torch.argsort(-energy).tolist()
    n = len(order)
    pick = [order[int(i)] for i in np.linspace(0, n - 1, min(n_neurons, n)).round()]
    kept = set(plan.layers[layer].kept_neurons)
    col_energy = (z ** 2).sum(0)
    top = max(1, n // 10)
    top_share = float(col_energy[torch.argsort(-col_energy)[:top]].sum() / col_energy.sum().clamp_min(1e-30))
    sentences = [
        f"Layer {layer}'s MLP turns each token into {n:,} neuron activations; stacked over tokens they form the "
        f"matrix Z ({z.shape[0]} tokens × {n:,} neurons here, {len(pick)} neurons shown, sorted by the output "
        "energy each carries, most left).",
        f"On this text the 10% most active neurons carry {top_share:.0%} of Z's energy: most columns are small or "
        "move together, which is what makes removing neurons possible.",
    ]
    return {"values": z[:, pick].tolist(), "neurons": pick, "kept": [j in kept for j in pick],
            "tokens": z.shape[0], "n_neurons": n, "top_decile_share": top_share, "sentences": sentences}


def spectrum_step(model, calibration, plan, layer: int) -> dict:
    """Step 2: the singular values of ``Z`` over the whole calibration (from its Gram)."""
    s = calibration_spectra(model, calibration)[layer]["mlp"]
    sv = np.asarray(s.singular_values)
    energy = np.cumsum(sv ** 2) / max(float((sv ** 2).sum()), 1e-30)
    k90 = int(np.searchsorted(energy, 0.90) + 1)
    k99 = int(np.searchsorted(energy, 0.99) + 1)
    n = len(sv)
    sentences = [
        f"The singular values of Z (over all {calibration.dense_stats[layer].n_tokens:,} calibration tokens) fall "
        f"from {sv[0]:.3g} to {sv[min(n - 1, n // 2)]:.3g} halfway down the list.",
        f"{k90:,} of {n:,} directions hold 90% of the energy and {k99:,} hold 99%: Z is close to a matrix of "
        f"much lower rank, so far fewer than {n:,} numbers per token describe it.",
    ]
    return {"singular_values": sv.tolist(), "k90": k90, "k99": k99, "n": n, "sentences": sentences}


def selection_step(model, calibration, plan, layer: int) -> dict:
    """Step 3: the interpolative decomposition's residual keeping ``k`` whole neurons against the
    SVD's optimum for the same ``k`` (the plan's cut marked)."""
    s = calibration_spectra(model, calibration)[layer]["mlp"]
    k = len(plan.layers[layer].kept_neurons)
    n = s.n_units
    idr, svd = s.id_residual[k], s.svd_residual[k]
    ratio = idr / svd if svd > 0 else float("inf")
    sentences = [
        "The SVD's directions mix every neuron, so they cannot be cut out of the weights; the interpolative "
        "decomposition instead keeps real columns of Z (whole neurons) and writes the others as combinations of them.",
        f"Keeping {k:,} of {n:,} neurons (this plan's cut) leaves out {_pct(idr)} of Z's energy, where the best "
        f"rank-{k:,} approximation would leave {_pct(svd)}"
        + (f": whole neurons cost {ratio:.1f}× the floor." if np.isfinite(ratio) and svd > 0 else "."),
    ]
    return {"id_residual": list(s.id_residual), "svd_residual": list(s.svd_residual), "kept": k, "n": n,
            "sentences": sentences}


def correction_step(model, calibration, plan, layer: int, held_out, n_tokens: int = 256) -> dict:
    """Step 4: the MLP output on held-out text (``held_out``: token windows or a
    :class:`CalibrationSet` the calibration did not use; a few windows of ``n_tokens`` are read),
    dense against pruned without and with the least-squares correction ``W_K + W_R Tᵀ``
    (``T = G_KK⁻¹ G_KR`` from the calibration Gram)."""
    adapter = get_adapter(model)
    lp = plan.layers[layer]
    keep = torch.tensor(sorted(lp.kept_neurons), dtype=torch.long)
    rem = torch.tensor(sorted(set(range(lp.intermediate_size)) - set(lp.kept_neurons)), dtype=torch.long)
    sample = _sample(held_out, 4, n_tokens)
    z = mlp_activations(model, sample.input_ids, sample.attention_mask, layer)
    w = adapter.mlp_out_proj(layer).weight.detach().to("cpu", torch.float64)
    y = z @ w.T
    if len(rem) == 0:
        plain = corrected = 0.0
    else:
        gram = calibration.dense_stats[layer].mlp_gram.to("cpu", torch.float64)
        y_plain = z[:, keep] @ w[:, keep].T
        g_kk = gram[keep][:, keep]
        t = torch.linalg.solve(g_kk + ridge_of(g_kk) * torch.eye(len(keep), dtype=gram.dtype), gram[keep][:, rem])
        w_fold = w[:, keep] + w[:, rem] @ t.T
        y_corr = z[:, keep] @ w_fold.T
        denom = float((y ** 2).sum()) or 1.0
        plain = float(((y - y_plain) ** 2).sum()) / denom
        corrected = float(((y - y_corr) ** 2).sum()) / denom
    sentences = [
        f"Removing {len(rem):,} neurons and doing nothing else changes the MLP's output by {_pct(plain)} of its "
        f"energy on {z.shape[0]:,} held-out tokens the calibration never saw.",
        "STAT folds a correction into the next matrix (down_proj): the kept neurons' weights become "
        "W_K + W_R·Tᵀ, T the least-squares map from kept to removed activations, at no cost at inference time.",
    ]
    if corrected < plain:
        sentences.append(f"With it the error drops to {_pct(corrected)}, {plain / max(corrected, 1e-30):.1f}× smaller.")
    elif len(rem):
        sentences.append(f"Here the error is {_pct(corrected)} with it: the map fitted on "
                         f"{calibration.dense_stats[layer].n_tokens:,} calibration tokens does not carry over to "
                         f"this text (too little or too different calibration text for {lp.intermediate_size:,} "
                         "neurons is the usual cause).")
    return {"error_without": plain, "error_with": corrected, "tokens": int(z.shape[0]), "removed": len(rem),
            "sentences": sentences}


def allocation_step(plan, layer: int) -> dict:
    """Step 5: the budget across layers: each layer's kept neuron fraction and its marginal damage
    at the cut (predicted damage added by removing one more neuron there)."""
    kept = [len(lp.kept_neurons) / lp.intermediate_size for lp in plan.layers]
    heads = [len(lp.kept_heads) / lp.num_heads for lp in plan.layers]
    marginal = []
    for lp in plan.layers:
        d = lp.mlp_damage
        k = len(lp.kept_neurons)
        marginal.append(float(d[k - 1] - d[k]) if d and 0 < k < len(d) else None)
    mine, mean = kept[layer], float(np.mean(kept))
    more = "more" if mine > mean else "fewer" if mine < mean else "as many"
    rank = sorted(range(len(kept)), key=lambda i: -kept[i]).index(layer) + 1
    sentences = [
        "One budget is shared by all layers: a layer keeps units while removing them would cost more predicted "
        "damage (increase in loss) than removing them elsewhere.",
        f"Layer {layer} keeps {mine:.0%} of its neurons and {heads[layer]:.0%} of its heads, {more} than the "
        f"average layer ({mean:.0%} of neurons); it ranks {rank} of {len(kept)} by neurons kept.",
    ]
    if marginal[layer] is not None:
        sentences.append(f"At its cut, removing one more neuron would add {marginal[layer]:.3g} predicted damage; the "
                         "allocator stops each layer where that price is about the same everywhere.")
    return {"kept_neurons": kept, "kept_heads": heads, "marginal": marginal, "sentences": sentences}


@torch.no_grad()
def effect_step(model, pruned, tokenizer, prompt: str, max_new_tokens: int = 24) -> dict:
    """Step 6: greedy continuations of ``prompt`` by the dense and the pruned decoder; each pruned
    token with ``KL(dense ‖ pruned)`` of the next-token distributions at its position."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs = {}
    for name, m in (("dense", model), ("pruned", pruned)):
        dev = next(m.parameters()).device
        outs[name] = m.generate(enc.to(dev), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)[0].cpu()
    seq = outs["pruned"].unsqueeze(0)
    n0 = enc.shape[1]
    lp_dense = F.log_softmax(model(seq.to(device)).logits[0, n0 - 1:-1].float().cpu(), -1)
    pdev = next(pruned.parameters()).device
    lp_pruned = F.log_softmax(pruned(seq.to(pdev)).logits[0, n0 - 1:-1].float().cpu(), -1)
    kl = (lp_dense.exp() * (lp_dense - lp_pruned)).sum(-1).clamp_min(0).tolist()
    ids = outs["pruned"][n0:].tolist()
    tokens = [tokenizer.decode([t]) for t in ids]
    dense_text = tokenizer.decode(outs["dense"][n0:], skip_special_tokens=True)
    same = sum(1 for a, b in zip(outs["dense"][n0:].tolist(), ids) if a == b)
    worst = int(np.argmax(kl)) if kl else 0
    sentences = [
        f"Both models continue the same prompt greedily; the pruned model picks the same token as the dense one at "
        f"{same} of {len(ids)} positions (until they diverge, the texts are the same).",
        f"Each pruned token is coloured by the KL divergence from the dense model's next-token distribution at that "
        f"point: mean {np.mean(kl):.3g} nats, largest {max(kl, default=0):.3g} at '{tokens[worst].strip() if tokens else ''}'.",
    ]
    return {"dense": dense_text, "tokens": tokens, "kl": kl, "same": same, "sentences": sentences}
