"""Surgery truths on tiny random decoders of every supported family."""

import copy

import pytest
import torch

from conftest import FAMILIES, mask_units, tiny_model
from stat_core.adapters import UnsupportedModelError, get_adapter
from stat_core.surgery.budget import block_geometry, block_parameter_count
from stat_core.calibration.statistics import LayerwiseRunner
from stat_core.surgery.plan import PrunePlan
from stat_core.config import PruneConfig
from stat_core.surgery.apply import apply_plan_
from stat_core.pipeline import stat_prune_


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_runner_reproduces_the_model(family, windows):
    model = tiny_model(family)
    adapter = get_adapter(model)
    runner = LayerwiseRunner(model, adapter, windows, batch_size=4)
    hidden = runner.hidden
    for layer in range(adapter.num_layers):
        hidden = runner.run_block(layer, hidden)
    # Block-by-block outputs, through the final norm, equal the model's own last hidden state.
    final = torch.cat(hidden)
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(final), model.model(input_ids=windows).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_identity(family, windows):
    model = tiny_model(family)
    ref = _logits(model, windows)
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.0, sensitivity_samples=2, batch_size=4))
    assert all(len(lp.kept_neurons) == lp.intermediate_size for lp in result.plan.layers)
    torch.testing.assert_close(_logits(model, windows), ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["one-shot", "propagate", "sequential"])
def test_prune_forward_generate_and_budget(family, mode, windows):
    model = tiny_model(family)
    before = block_parameter_count(get_adapter(model))
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.4, mode=mode, sensitivity_samples=2, batch_size=4))
    adapter = get_adapter(model)
    after = block_parameter_count(adapter)
    neuron_params = block_geometry(adapter, 0).mlp_params_per_neuron
    # Budget met within one unit (one neuron's parameters).
    assert abs((before - after) - 0.4 * before) <= neuron_params
    # Physically smaller, GQA bookkeeping right: forward and cached generation run.
    for lp in result.plan.layers:
        shape = adapter.layer_shape(lp.layer)
        assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (
            len(lp.kept_heads), len(lp.kept_kv_heads), len(lp.kept_neurons))
        assert shape.num_heads % shape.num_kv_heads == 0
        assert adapter.attention(lp.layer).num_key_value_groups == shape.num_heads // shape.num_kv_heads
        assert len(lp.kept_heads) >= 1 and len(lp.kept_neurons) >= 1
    logits = _logits(model, windows)
    assert torch.isfinite(logits).all()
    out = model.generate(windows[:2, :5], max_new_tokens=6, do_sample=False, use_cache=True)
    out_nocache = model.generate(windows[:2, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out, out_nocache)


def test_heads_actually_removed_under_gqa(windows):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    stat_prune_(model, windows, PruneConfig(sparsity=0.25, prune_neurons=False, sensitivity_samples=0, batch_size=4))
    adapter = get_adapter(model)
    shapes = [adapter.layer_shape(i) for i in range(adapter.num_layers)]
    assert sum(s.num_heads for s in shapes) < 16
    assert torch.isfinite(_logits(model, windows)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_uncorrected_pruning_equals_masked_dense(family, windows):
    model = tiny_model(family)
    result = stat_prune_(copy.deepcopy(model), windows, PruneConfig(sparsity=0.4, sensitivity_samples=0, batch_size=4))
    masked = mask_units(model, result.plan)
    apply_plan_(model, result.plan, stats=None)
    torch.testing.assert_close(_logits(model, windows), _logits(masked, windows), rtol=1e-4, atol=1e-5)


def _duplicate_units(model):
    """Make half the neurons and one head per KV group exact copies: activations become low rank."""
    adapter = get_adapter(model)
    hd = adapter.head_dim
    with torch.no_grad():
        for i in range(adapter.num_layers):
            for proj in adapter.mlp_in_projs(i):
                half = proj.weight.shape[0] // 2
                proj.weight[half:] = proj.weight[:half]
            q = adapter.attention(i).q_proj.weight
            shape = adapter.layer_shape(i)
            group = shape.num_heads // shape.num_kv_heads
            for g in range(shape.num_kv_heads):
                first = g * group
                for h in range(first + 1, first + group):
                    q[h * hd:(h + 1) * hd] = q[first * hd:(first + 1) * hd]
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("mode", ["one-shot", "propagate", "sequential"])
def test_exactly_low_rank_activations_are_reproduced(family, mode, windows):
    model = _duplicate_units(tiny_model(family))
    ref = _logits(model, windows)
    adapter = get_adapter(model)
    geo = block_geometry(adapter, 0)
    shape = adapter.layer_shape(0)
    redundant = adapter.num_layers * (
        geo.mlp_params_per_neuron * (shape.intermediate_size // 2)
        + (geo.q_params_per_head + geo.o_params_per_head) * (shape.num_heads - shape.num_kv_heads))
    sparsity = 0.95 * redundant / block_parameter_count(adapter)  # slack: any subset of copies is free
    uncorrected = copy.deepcopy(model)
    result = stat_prune_(model, windows, PruneConfig(sparsity=sparsity, mode=mode, sensitivity_samples=2, batch_size=4))
    rel = (_logits(model, windows) - ref).norm() / ref.norm()
    assert rel < 1e-4
    # Without the correction the same cut is far off: the correction is what reproduces.
    apply_plan_(uncorrected, result.plan, stats=None)
    assert (_logits(uncorrected, windows) - ref).norm() / ref.norm() > 100 * rel


@pytest.mark.parametrize("mode", ["one-shot", "propagate"])
def test_plan_json_round_trip_reapplies_identically(mode, windows):
    model = tiny_model("llama")
    fresh = copy.deepcopy(model)
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.3, mode=mode, sensitivity_samples=2, batch_size=4))
    plan = PrunePlan.from_json(result.plan.to_json())
    assert plan.to_dict() == result.plan.to_dict()
    apply_plan_(fresh, plan, result.stats)
    torch.testing.assert_close(_logits(fresh, windows), _logits(model, windows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("affine", [False, True])
def test_dense_target_correction_is_the_least_squares_fit(affine):
    """Sequential mode's correction from sums alone equals a direct least-squares solve on the
    activations: the kept units of the pruned path (plus a constant with ``affine``) mapped onto
    the dense path's outputs ``W z_dense``."""
    from stat_core.calibration.statistics import BlockStats, PairedStats
    from stat_core.surgery.apply import dense_target_correction

    gen = torch.Generator().manual_seed(0)
    n, units, d = 400, 12, 6
    zd = torch.randn(n, units, generator=gen, dtype=torch.float64) + 0.5
    zp = 0.8 * zd + 0.3 * torch.randn(n, units, generator=gen, dtype=torch.float64)  # a perturbed path
    w = torch.randn(d, units, generator=gen, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 7, 9, 11])
    stats = BlockStats(zp.T @ zp, zp.T @ zp, n, 1.0, zp.sum(0), zp.sum(0))
    paired = PairedStats({"mlp": zp.T @ zd}, {"mlp": zd.sum(0)}, n)
    new_w, bias = dense_target_correction(w, stats, paired, "mlp", kept, affine, ridge_rel=1e-12)
    design = torch.cat([zp[:, kept], torch.ones(n, 1, dtype=torch.float64)], 1) if affine else zp[:, kept]
    sol = torch.linalg.lstsq(design, zd @ w.T).solution  # (k [+1], d)
    torch.testing.assert_close(new_w, sol[: len(kept)].T, rtol=1e-7, atol=1e-9)
    if affine:
        torch.testing.assert_close(bias, sol[-1], rtol=1e-7, atol=1e-9)
    else:
        assert bias is None


def test_sequential_mode_on_the_first_layer_equals_one_shot(windows):
    """Before any layer is cut the pruned and dense paths coincide, so the first layer's correction
    is plain STAT; a plan that cuts only attention of layer 0 gives one-shot's model."""
    model = tiny_model("llama", num_hidden_layers=1)
    cfg = dict(sparsity=0.2, prune_neurons=False, sensitivity_samples=0, batch_size=4)
    one = stat_prune_(copy.deepcopy(model), windows, PruneConfig(**cfg))
    seq_model = copy.deepcopy(model)
    seq = stat_prune_(seq_model, windows, PruneConfig(**cfg, mode="sequential"))
    assert seq.plan.layers[0].kept_heads == one.plan.layers[0].kept_heads
    one_model = copy.deepcopy(model)
    apply_plan_(one_model, one.plan, one.stats)
    torch.testing.assert_close(_logits(seq_model, windows), _logits(one_model, windows), rtol=1e-4, atol=1e-5)


def test_stat_beats_baselines_on_structured_activations(windows):
    model = _duplicate_units(tiny_model("llama"))
    ref = _logits(model, windows)
    errors = {}
    for method in ["stat", "no-correction", "magnitude"]:
        m = copy.deepcopy(model)
        stat_prune_(m, windows, PruneConfig(sparsity=0.3, method=method, sensitivity_samples=2, batch_size=4))
        errors[method] = float((_logits(m, windows) - ref).norm() / ref.norm())
    assert errors["stat"] < errors["no-correction"]
    assert errors["stat"] < errors["magnitude"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_and_device_preserved(dtype, windows):
    model = tiny_model("llama").to(dtype)
    stat_prune_(model, windows, PruneConfig(sparsity=0.3, sensitivity_samples=2, batch_size=4))
    params = list(model.parameters())
    assert all(p.dtype == dtype for p in params)
    assert all(p.device.type == "cpu" for p in params)
    assert torch.isfinite(_logits(model, windows).float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_device_preserved(windows):
    model = tiny_model("llama").cuda()
    stat_prune_(model, windows, PruneConfig(sparsity=0.3, sensitivity_samples=2, batch_size=4))
    assert all(p.device.type == "cuda" for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["one-shot", "propagate"])
def test_cuda_prune_matches_cpu(family, mode, windows):
    """The same float32 model pruned on the GPU and on the CPU: the same plan, and pruned logits
    equal up to float summation order (the GPU's reductions and TF32 are not the CPU's)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = tiny_model(family)
    gpu = copy.deepcopy(cpu).cuda()
    cfg = PruneConfig(sparsity=0.3, sensitivity_samples=2, batch_size=4, mode=mode)
    plan_cpu = stat_prune_(cpu, windows, cfg).plan
    plan_gpu = stat_prune_(gpu, windows, cfg).plan
    for a, b in zip(plan_cpu.layers, plan_gpu.layers):
        assert sorted(a.kept_heads) == sorted(b.kept_heads)
        assert sorted(a.kept_neurons) == sorted(b.kept_neurons)
    ref = _logits(cpu, windows)
    out = _logits(gpu, windows.cuda()).cpu()
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_unsupported_architecture_is_named(windows):
    from transformers import BloomConfig, BloomForCausalLM  # (GPT-2, the earlier example, is supported now)

    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="bloom.*supported types are: .*llama"):
        stat_prune_(model, windows % 64, PruneConfig(sparsity=0.2))


def test_impossible_budget_is_refused(windows):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at most"):
        stat_prune_(model, windows, PruneConfig(sparsity=0.99, sensitivity_samples=0, batch_size=4))
    with pytest.raises(ValueError, match="sparsity"):
        PruneConfig(sparsity=1.5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("heads,neurons", [(True, True), (False, True), (True, False)])
def test_impossible_budget_is_refused_before_calibration(family, heads, neurons, windows):
    """The geometric bound is the allocator's: just under it plans, just over it is refused at once."""
    from stat_core.methods.base import max_removable_fraction

    model = tiny_model(family)
    config = dict(sensitivity_samples=0, batch_size=4, prune_heads=heads, prune_neurons=neurons)
    bound = max_removable_fraction(model, PruneConfig(sparsity=0.0, **config))
    assert 0 < bound < 1
    calls = []
    with pytest.raises(ValueError, match=f"at most {bound:.1%}"):
        stat_prune_(model, windows, PruneConfig(sparsity=bound + 0.005, **config), progress=lambda *a: calls.append(a))
    assert calls == []  # refused before any calibration work
    result = stat_prune_(model, windows, PruneConfig(sparsity=bound - 0.005, **config))
    assert abs(result.plan.budget["achieved"] - (bound - 0.005)) < 0.01  # within one neuron of the target


def test_flops_budget_is_met(windows):
    from stat_core.surgery.budget import block_macs

    model = tiny_model("llama")
    before = block_macs(get_adapter(model), 512)
    stat_prune_(model, windows, PruneConfig(sparsity=0.3, budget_kind="flops", sensitivity_samples=0, batch_size=4))
    after = block_macs(get_adapter(model), 512)
    assert abs((1 - after / before) - 0.3) < 0.01


def test_plan_carries_decay_curves(windows):
    model = tiny_model("llama")
    plan = stat_prune_(model, windows, PruneConfig(sparsity=0.3, sensitivity_samples=2, batch_size=4)).plan
    for lp in plan.layers:
        curve = lp.mlp_damage
        assert len(curve) == lp.intermediate_size + 1 and curve[-1] == 0
        assert all(a >= b - 1e-12 for a, b in zip(curve, curve[1:]))  # greedy order: non-increasing
        assert sorted(lp.head_order) == list(range(lp.num_heads))
        assert {o["heads"] for o in lp.attn_options} >= {2, 4}
    assert plan.budget["kind"] == "params" and abs(plan.budget["achieved"] - 0.3) < 0.01


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_replanning_from_cached_calibration_equals_a_fresh_prune(family, windows):
    from stat_core.pipeline import calibrate, prune_from_calibration_

    dense = tiny_model(family)
    config = PruneConfig(sparsity=0.35, sensitivity_samples=2, batch_size=4)
    fresh = copy.deepcopy(dense)
    direct = stat_prune_(fresh, windows, config)
    calib = calibrate(dense, windows, config)
    for sparsity in (0.2, 0.35):  # another budget first, then the same one, from the same statistics
        replanned = copy.deepcopy(dense)
        result = prune_from_calibration_(replanned, calib, PruneConfig(sparsity=sparsity, sensitivity_samples=2,
                                                                        batch_size=4))
        assert abs(result.plan.budget["achieved"] - sparsity) < 0.02, (sparsity, result.plan.budget)
        if sparsity == 0.35:
            assert result.plan.layers == direct.plan.layers
            torch.testing.assert_close(_logits(replanned, windows), _logits(fresh, windows))
        else:
            kept = sum(len(lp.kept_neurons) for lp in result.plan.layers)
            assert kept > sum(len(lp.kept_neurons) for lp in direct.plan.layers)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_uniform_plan_has_one_shape_and_meets_the_budget(family, windows):
    model = tiny_model(family, num_hidden_layers=3)
    before = block_parameter_count(get_adapter(model))
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.3, uniform=True, sensitivity_samples=2, batch_size=4))
    adapter = get_adapter(model)
    shapes = {adapter.layer_shape(i) for i in range(adapter.num_layers)}
    assert len(shapes) == 1
    removed = before - block_parameter_count(adapter)
    per_layer_neuron = block_geometry(adapter, 0).mlp_params_per_neuron
    # At least the target, overshooting by less than one neuron in every layer.
    assert 0.3 * before - 1e-6 <= removed < 0.3 * before + adapter.num_layers * per_layer_neuron
    model.generate(windows[:1, :5], max_new_tokens=3, do_sample=False)


def test_uniform_budget_beyond_reach_is_refused(windows):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="same counts in every layer"):
        stat_prune_(model, windows, PruneConfig(sparsity=0.99, uniform=True, sensitivity_samples=0, batch_size=4))


def test_activation_norm_baseline_keeps_stat_counts_and_largest_activations(windows):
    from stat_core.pipeline import calibrate, plan_pruning

    model = tiny_model("llama")
    calib = calibrate(model, windows, PruneConfig(sparsity=0.3, sensitivity_samples=0, batch_size=4))
    stat_plan = plan_pruning(model, calib, PruneConfig(sparsity=0.3))
    act_plan = plan_pruning(model, calib, PruneConfig(sparsity=0.3, method="activation-norm"))
    assert act_plan.kept_summary() == stat_plan.kept_summary()
    for lp in act_plan.layers:
        energy = torch.diagonal(calib.dense_stats[lp.layer].mlp_gram)
        dropped = sorted(set(range(lp.intermediate_size)) - set(lp.kept_neurons))
        if dropped:
            assert energy[lp.kept_neurons].min() >= energy[dropped].max()


def test_calibration_size_warning_scales_with_mlp_width():
    from stat_core.calibration.sizes import MIN_TOKENS_PER_NEURON, calibration_size_warning

    model = tiny_model("llama")  # d_ff 64
    assert calibration_size_warning(model, MIN_TOKENS_PER_NEURON * 64) is None
    assert "64 neurons" in calibration_size_warning(model, 100)


def test_affine_correction_is_least_squares_with_an_intercept():
    """The ``affine`` correction equals an explicit least-squares fit of Z on [Z_I, 1], folded into
    W_out (weight W Tᵀ, bias W c), and never fits the calibration outputs worse than no intercept."""
    import numpy as np

    from stat_core.calibration.statistics import BlockStats
    from stat_core.surgery.apply import _correction

    gen = torch.Generator().manual_seed(3)
    n, units, d_out = 400, 12, 5
    z = torch.randn(n, units, generator=gen, dtype=torch.float64) + torch.linspace(-2, 3, units, dtype=torch.float64)
    z[:, 5] = 0.5 * z[:, 1] - 0.2 * z[:, 7] + 1.5 + 0.05 * torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.randn(d_out, units, generator=gen, dtype=torch.float64)
    stats = BlockStats(attn_gram=z.T @ z, mlp_gram=z.T @ z, n_tokens=n, resid_energy=1.0,
                       attn_sum=z.sum(0), mlp_sum=z.sum(0))
    kept = torch.tensor([0, 1, 2, 7, 9, 11])
    new_w, bias = _correction(w, stats, "mlp", kept, "affine", 0.0)
    design = np.concatenate([z[:, kept].numpy(), np.ones((n, 1))], axis=1)
    coef = np.linalg.lstsq(design, z.numpy(), rcond=None)[0]  # (k + 1, units): [T; cᵀ]
    np.testing.assert_allclose(new_w.numpy(), w.numpy() @ coef[:-1].T, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(bias.numpy(), w.numpy() @ coef[-1], rtol=1e-8, atol=1e-9)
    out = z @ w.T
    ls_w, ls_bias = _correction(w, stats, "mlp", kept, "least-squares", 0.0)
    assert ls_bias is None
    err_affine = float(((z[:, kept] @ new_w.T + bias - out) ** 2).sum())
    err_ls = float(((z[:, kept] @ ls_w.T - out) ** 2).sum())
    assert err_affine < 0.9 * err_ls  # the means are far from zero: the intercept carries them (0.85 here)
    # The centred damage the decompositions use is exactly the affine fit's residual.
    from stat_core.linalg import output_error

    predicted = output_error(stats.second_moment("mlp", centered=True), w, kept, ridge=0.0)
    assert abs(predicted - err_affine) <= 1e-8 * err_ls


def test_model_labelled_sensitivity_is_the_fisher_of_the_models_own_distribution():
    """``labels="model"`` samples next tokens from the model: averaged over many copies of one
    window it converges to the exact Fisher Σ_s Σ_c p_s(c) ∇log p_s(c) ∇log p_s(c)ᵀ at every block
    output, computed here by one backward pass per (position, class)."""
    from stat_core.adapters import get_adapter
    from stat_core.calibration.statistics import output_sensitivity

    model = tiny_model("llama", vocab_size=12, hidden_size=16, intermediate_size=32)
    adapter = get_adapter(model)
    window = torch.randint(0, 12, (1, 5), generator=torch.Generator().manual_seed(2))
    copies = 1000  # relative error ≈ 0.04 at 1000 copies (0.02 at 3000)
    estimate = output_sensitivity(model, adapter, window.repeat(copies, 1), batch_size=1000, labels="model")

    outputs = {}
    handles = [proj.register_forward_hook(lambda m, a, out, key=key: outputs.__setitem__(key, out))
               for i in range(adapter.num_layers)
               for key, proj in (((i, "attn"), adapter.attn_out_proj(i)), ((i, "mlp"), adapter.mlp_out_proj(i)))]
    exact = {key: torch.zeros(16, 16, dtype=torch.float64) for key in
             [(i, k) for i in range(adapter.num_layers) for k in ("attn", "mlp")]}
    log_p = torch.log_softmax(model(window, use_cache=False).logits[0, :-1].double(), -1)  # (T-1, V)
    for h in handles:
        h.remove()
    keys = list(exact)
    for s in range(log_p.shape[0]):
        for c in range(12):
            grads = torch.autograd.grad(log_p[s, c], [outputs[k] for k in keys], retain_graph=True)
            p = float(log_p[s, c].detach().exp())
            for k, g in zip(keys, grads):
                g = g[0].double()
                exact[k] += p * g.T @ g
    for (i, kind), f in exact.items():
        f = f / window.shape[1]  # per token, like the estimate
        rel = float((estimate[i][kind] - f).norm() / f.norm())
        assert rel < 0.1, (i, kind, rel)
    # The text's own next tokens give a different matrix (the empirical Fisher).
    empirical = output_sensitivity(model, adapter, window, labels="data")
    assert float((empirical[0]["mlp"] - exact[(0, "mlp")] / 5).norm() / (exact[(0, "mlp")] / 5).norm()) > 0.1


def test_corrections_from_another_text_keep_the_selection_and_fit_on_that_text(windows):
    """``correction_windows``: the plan is the one chosen on the calibration text, the weights are the
    ones that plan gets with the other text's least-squares corrections (and differ from its own)."""
    from stat_core.pipeline import calibrate, plan_pruning

    other = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(7))
    config = PruneConfig(sparsity=0.3, sensitivity_samples=2)
    dense = tiny_model("llama")
    both, own = copy.deepcopy(dense), copy.deepcopy(dense)
    result = stat_prune_(both, windows, config, correction_windows=other)
    own_result = stat_prune_(own, windows, config)
    assert result.plan.layers == own_result.plan.layers  # units and counts chosen on ``windows`` alone
    expected = copy.deepcopy(dense)
    apply_plan_(expected, plan_pruning(dense, calibrate(dense, windows, config), config),
                calibrate(dense, other, PruneConfig(sparsity=0.0)).dense_stats)
    for a, b in zip(both.state_dict().values(), expected.state_dict().values()):
        torch.testing.assert_close(a, b)
    o_proj = lambda m: m.model.layers[0].self_attn.o_proj.weight  # noqa: E731
    assert o_proj(both).shape == o_proj(own).shape and not torch.allclose(o_proj(both), o_proj(own))
    with pytest.raises(ValueError, match="one-shot only"):
        stat_prune_(copy.deepcopy(dense), windows, PruneConfig(sparsity=0.3, mode="propagate"),
                    correction_windows=other)
