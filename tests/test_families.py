"""Families described only by their layout (``stat_core.adapters.modeling_stat.LAYOUTS``): the same truths as the
Llama and BERT families: keep-all identity, masked equivalence, exact low-rank reproduction,
export and reload three ways. Tiny random configs; no weights are downloaded."""

import copy
import json

import pytest
import torch

from conftest import mask_units
from stat_core.adapters import UnsupportedModelError, get_adapter, supported_model_types
from stat_core.adapters.declarative import LinearView
from stat_core.surgery.budget import block_geometry, block_parameter_count
from stat_core.calibration.statistics import LayerwiseRunner
from stat_core.export.hf import export_pruned, load_pruned
from stat_core.config import PruneConfig
from stat_core.surgery.apply import apply_plan_
from stat_core.pipeline import stat_prune_
from test_export import _decoder_inputs, _load_in_clean_interpreter

NEW_FAMILIES = ["opt", "gpt2", "gpt_neox", "phi3"]


def tiny_family_model(family: str = "opt", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, OPTConfig, Phi3Config

    if family == "opt":
        config = OPTConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                     vocab_size=128, max_position_embeddings=128, word_embed_proj_dim=32),
                              **overrides})
    elif family == "gpt2":  # Conv1D projections, fused c_attn
        config = GPT2Config(**{**dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=128, n_positions=128,
                                      bos_token_id=0, eos_token_id=0), **overrides})
    elif family == "gpt_neox":  # Pythia's layout: per-head interleaved query_key_value, rotary on 1/4 of each head
        config = GPTNeoXConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=128, max_position_embeddings=128,
                                         bos_token_id=0, eos_token_id=0), **overrides})
    elif family == "phi3":  # fused qkv_proj with grouped-query attention, fused gate_up_proj
        config = Phi3Config(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=128, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0), **overrides})
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


_KV_HEADS = {"phi3": 2}  # the tiny configs' KV heads where they differ from the 4 query heads


def _base(model):
    return getattr(model, {"opt": "model", "gpt2": "transformer", "gpt_neox": "gpt_neox",
                           "phi3": "model"}[model.config.model_type])


def _final_norm(model):
    if model.config.model_type == "opt":
        return model.model.decoder.final_layer_norm
    return getattr(_base(model), {"gpt2": "ln_f", "gpt_neox": "final_layer_norm", "phi3": "norm"}[model.config.model_type])


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_adapter_reads_the_layout(family, windows):
    model = tiny_family_model(family)
    adapter = get_adapter(model)
    assert adapter.family == family and adapter.num_layers == 2 and adapter.head_dim == 8
    shape = adapter.layer_shape(1)
    assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (4, _KV_HEADS.get(family, 4), 64)
    # Block-by-block outputs, through the final norm, equal the model's own last hidden state.
    runner = LayerwiseRunner(model, adapter, windows, batch_size=4)
    hidden = runner.hidden
    for layer in range(adapter.num_layers):
        hidden = runner.run_block(layer, hidden)
    with torch.no_grad():
        torch.testing.assert_close(_final_norm(model)(torch.cat(hidden)),
                                   _base(model)(input_ids=windows).last_hidden_state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_keep_all_is_identity(family, windows):
    model = tiny_family_model(family)
    ref = _logits(model, windows)
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.0, sensitivity_samples=2, batch_size=4))
    assert all(len(lp.kept_neurons) == lp.intermediate_size and len(lp.kept_heads) == lp.num_heads
               for lp in result.plan.layers)
    torch.testing.assert_close(_logits(model, windows), ref)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("mode", ["one-shot", "propagate"])
def test_prune_forward_generate_and_budget(family, mode, windows):
    model = tiny_family_model(family)
    before = block_parameter_count(get_adapter(model))
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.4, mode=mode, sensitivity_samples=2, batch_size=4))
    adapter = get_adapter(model)
    after = block_parameter_count(adapter)
    assert abs((before - after) - 0.4 * before) <= block_geometry(adapter, 0).mlp_params_per_neuron
    assert any(len(lp.kept_heads) < lp.num_heads for lp in result.plan.layers), "no head was removed"
    for lp in result.plan.layers:
        shape = adapter.layer_shape(lp.layer)
        assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (
            len(lp.kept_heads), len(lp.kept_kv_heads), len(lp.kept_neurons))
        attn = adapter.attention(lp.layer)
        if family == "phi3":  # the query width its forward reads from (its own view of) the config
            assert attn.config.num_attention_heads == shape.num_heads
            assert attn.num_key_value_heads == shape.num_kv_heads
            assert attn.num_key_value_groups == shape.num_heads // shape.num_kv_heads
        elif family != "gpt_neox":  # GPT-NeoX's attention derives the count from query_key_value's width
            assert attn.num_heads == shape.num_heads
    assert torch.isfinite(_logits(model, windows)).all()
    out = model.generate(windows[:2, :5], max_new_tokens=6, do_sample=False, use_cache=True)
    out_nocache = model.generate(windows[:2, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out, out_nocache)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_uncorrected_pruning_equals_masked_dense(family, windows):
    model = tiny_family_model(family)
    result = stat_prune_(copy.deepcopy(model), windows, PruneConfig(sparsity=0.4, sensitivity_samples=0, batch_size=4))
    assert any(len(lp.kept_heads) < lp.num_heads for lp in result.plan.layers)
    masked = mask_units(model, result.plan)
    apply_plan_(model, result.plan, stats=None)
    torch.testing.assert_close(_logits(model, windows), _logits(masked, windows), rtol=1e-4, atol=1e-5)


def _copy_rows(proj, dst: slice, src: slice) -> None:
    """Rows ``src`` of a Linear-shaped projection (weight and bias) over its rows ``dst``."""
    if isinstance(proj, LinearView):  # Conv1D or part of a fused projection: written through the view
        proj.copy_rows_(dst, src)
        return
    proj.weight[dst] = proj.weight[src]
    if proj.bias is not None:
        proj.bias[dst] = proj.bias[src]


def _duplicate_units(model):
    """Second half of the neurons, of the query heads and of the KV heads exact copies of the first
    (weights and biases): both activations become exactly low rank."""
    adapter = get_adapter(model)
    hd = adapter.head_dim
    with torch.no_grad():
        for i in range(adapter.num_layers):
            for proj in adapter.mlp_in_projs(i):
                half = proj.out_features // 2
                _copy_rows(proj, slice(half, 2 * half), slice(0, half))
            shape = adapter.layer_shape(i)
            half = shape.num_heads // 2 * hd
            _copy_rows(adapter.query_proj(i), slice(half, 2 * half), slice(0, half))
            half = shape.num_kv_heads // 2 * hd
            for proj in adapter.key_value_projs(i):
                _copy_rows(proj, slice(half, 2 * half), slice(0, half))
    return model


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("mode", ["one-shot", "propagate"])
def test_exactly_low_rank_activations_are_reproduced(family, mode, windows):
    model = _duplicate_units(tiny_family_model(family))
    ref = _logits(model, windows)
    adapter = get_adapter(model)
    geo = block_geometry(adapter, 0)
    shape = adapter.layer_shape(0)
    redundant = adapter.num_layers * (
        geo.mlp_params_per_neuron * (shape.intermediate_size // 2)
        + (geo.q_params_per_head + geo.o_params_per_head) * (shape.num_heads // 2)
        + geo.kv_params_per_head * (shape.num_kv_heads // 2))
    sparsity = 0.95 * redundant / block_parameter_count(adapter)  # slack: any subset of copies is free
    uncorrected = copy.deepcopy(model)
    result = stat_prune_(model, windows, PruneConfig(sparsity=sparsity, mode=mode, sensitivity_samples=2, batch_size=4))
    assert sum(lp.num_heads - len(lp.kept_heads) for lp in result.plan.layers) >= 1
    rel = (_logits(model, windows) - ref).norm() / ref.norm()
    assert rel < 1e-4
    # Without the correction the same cut is far off: the correction is what reproduces.
    apply_plan_(uncorrected, result.plan, stats=None)
    assert (_logits(uncorrected, windows) - ref).norm() / ref.norm() > 100 * rel


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_non_uniform_export_reloads_both_ways_with_same_logits(family, windows, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_family_model(family)
    plan = stat_prune_(model, windows, PruneConfig(sparsity=0.4, sensitivity_samples=2, batch_size=4,
                                                   intercept=True)).plan
    shapes = {(len(lp.kept_heads), len(lp.kept_neurons)) for lp in plan.layers}
    assert len(shapes) > 1, "the test needs layers of different shapes"
    inputs = _decoder_inputs()
    ref = _logits(model, inputs["input_ids"])
    info = export_pruned(model, None, tmp_path / "out", plan=plan)
    assert not info.uniform and "modeling_stat.py" in info.files
    reloaded, _ = load_pruned(info.path)
    torch.testing.assert_close(_logits(reloaded, inputs["input_ids"]), ref, rtol=0, atol=0)
    remote = _load_in_clean_interpreter(info.path, "AutoModelForCausalLM", inputs, tmp_path)
    assert remote["class"].startswith("StatPruned")
    torch.testing.assert_close(remote["logits"], ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(info.path, trust_remote_code=False)


@pytest.mark.parametrize("family, overrides", [("opt", {}), ("opt", {"enable_bias": False}), ("gpt2", {}),
                                               ("gpt_neox", {}), ("phi3", {}),
                                               ("gpt_neox", {"attention_bias": False, "use_parallel_residual": False})])
def test_uniform_export_keeps_heads_and_loads_stock(family, overrides, windows, tmp_path):
    """The stock config derives the head size from hidden_size / heads: uniform plans prune
    neurons only, and the width goes into the family's own field (OPT: ``ffn_dim``, GPT-2:
    ``n_inner``). OPT without biases (``enable_bias=False``): the intercept turns the stock flag on;
    the other biases are zeros. GPT-NeoX's MLP always has biases (``attention_bias`` covers only
    the attention), and its sequential-residual variant loads the same way."""
    from transformers import AutoModelForCausalLM

    model = tiny_family_model(family, **overrides)
    enable_bias = overrides.get("enable_bias", True)
    plan = stat_prune_(model, windows, PruneConfig(sparsity=0.3, uniform=True, sensitivity_samples=2, batch_size=4,
                                                   intercept=True)).plan
    assert all(len(lp.kept_heads) == lp.num_heads for lp in plan.layers)
    widths = {len(lp.kept_neurons) for lp in plan.layers}
    assert len(widths) == 1 and widths.pop() < 64
    inputs = _decoder_inputs()
    ref = _logits(model, inputs["input_ids"])
    info = export_pruned(model, None, tmp_path / "out", plan=plan)
    assert info.uniform and "modeling_stat.py" not in info.files
    config = json.loads((info.path / "config.json").read_text())
    ffn_field = {"opt": "ffn_dim", "gpt2": "n_inner", "gpt_neox": "intermediate_size", "phi3": "intermediate_size"}[family]
    assert "auto_map" not in config and config[ffn_field] == len(plan.layers[0].kept_neurons)
    assert family != "opt" or config["enable_bias"] is True
    down = get_adapter(model).mlp_out_proj(0)
    if family == "phi3":  # no stock flag declares an MLP bias: the uniform plan's intercept falls back
        assert down.bias is None
    else:
        assert down.bias is not None and down.bias.abs().max() > 0
    stock = AutoModelForCausalLM.from_pretrained(info.path).eval()
    assert type(stock).__name__ == type(model).__name__
    torch.testing.assert_close(_logits(stock, inputs["input_ids"]), ref, rtol=0, atol=0)
    if not enable_bias:  # biases the flag forced onto projections the correction did not touch are zero
        q_bias = get_adapter(stock).query_proj(0).bias
        torch.testing.assert_close(q_bias, torch.zeros_like(q_bias), rtol=0, atol=0)
    reloaded, _ = load_pruned(info.path)
    torch.testing.assert_close(_logits(reloaded, inputs["input_ids"]), ref, rtol=0, atol=0)
    remote = _load_in_clean_interpreter(info.path, "AutoModelForCausalLM", inputs, tmp_path)
    torch.testing.assert_close(remote["logits"], ref, rtol=0, atol=0)


def test_unsupported_architecture_lists_every_supported_family(windows):
    from transformers import BloomConfig, BloomForCausalLM

    assert {"opt", "gpt2", "llama", "bert"} <= set(supported_model_types())
    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError) as err:
        stat_prune_(model, windows % 64, PruneConfig(sparsity=0.2))
    message = str(err.value)
    assert "'bloom'" in message
    assert message.endswith(", ".join(supported_model_types()) + ".")
    listed = message.split("supported types are:")[1]
    assert "opt" in listed and "gpt2" in listed


def test_conv1d_views_share_storage_and_read_as_linear():
    """GPT-2's Conv1D weights are (in, out): the adapter's views are (out, in), write through, and
    the fused c_attn splits into q, k, v of heads·head_dim rows each."""
    model = tiny_family_model("gpt2")
    adapter = get_adapter(model)
    c_attn = model.transformer.h[0].attn.c_attn
    q, (k, v) = adapter.query_proj(0), adapter.key_value_projs(0)
    assert q.weight.shape == k.weight.shape == v.weight.shape == (32, 32)
    torch.testing.assert_close(v.weight, c_attn.weight[:, 64:].T, rtol=0, atol=0)
    torch.testing.assert_close(v.bias, c_attn.bias[64:], rtol=0, atol=0)
    down = adapter.mlp_out_proj(0)
    assert (down.out_features, down.in_features) == (32, 64)
    x = torch.randn(5, 64)
    torch.testing.assert_close(model.transformer.h[0].mlp.c_proj(x), x @ down.weight.T + down.bias)
    with torch.no_grad():
        k.weight[3, 7] = 11.0
    assert c_attn.weight[7, 32 + 3] == 11.0


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_method_runs_or_refuses_by_name(family, windows):
    """The peers and baselines read projections through the adapter (GPT-2: Conv1D views; LLM-Pruner's
    gradients land on the stored Conv1D weights); SliceGPT refuses families it does not rotate."""
    from stat_core.methods.base import MethodNotApplicable
    from stat_core.methods.registry import method_names

    for name in method_names():
        model = tiny_family_model(family)
        config = PruneConfig(sparsity=0.3, method=name, sensitivity_samples=2, batch_size=4)
        if name in ("slicegpt", "block-movement"):  # block movement: encoder classifiers only
            with pytest.raises(MethodNotApplicable, match=family):
                stat_prune_(model, windows, config)
            continue
        plan = stat_prune_(model, windows, config).plan
        adapter = get_adapter(model)
        assert sum(len(lp.kept_neurons) for lp in plan.layers) < sum(lp.intermediate_size for lp in plan.layers), name
        for lp in plan.layers:
            shape = adapter.layer_shape(lp.layer)
            assert (shape.num_heads, shape.intermediate_size) == (len(lp.kept_heads), len(lp.kept_neurons)), name
        assert torch.isfinite(_logits(model, windows)).all(), name


def test_gpt_neox_interleaved_views_match_the_attention_split():
    """GPT-NeoX's query_key_value rows are per head [q_h; k_h; v_h]: the adapter's q, k, v views give
    exactly what the stock attention splits out (its view to (heads, 3·head_size) and chunk), and
    copy_rows_ writes through the gathered views."""
    model = tiny_family_model("gpt_neox")
    adapter = get_adapter(model)
    fused = model.gpt_neox.layers[0].attention.query_key_value
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        stock = fused(x).view(3, 5, 4, 3 * 8).chunk(3, dim=-1)  # each (3, 5, heads, head_size)
        for part, view in zip(stock, [adapter.query_proj(0), *adapter.key_value_projs(0)]):
            torch.testing.assert_close((x @ view.weight.T + view.bias).view(3, 5, 4, 8), part)
        k = adapter.key_value_projs(0)[0]
        k.copy_rows_(slice(8, 16), slice(0, 8))  # key head 1 := key head 0
    torch.testing.assert_close(fused.weight[3 * 8 + 8:3 * 8 + 16], fused.weight[8:16], rtol=0, atol=0)
    torch.testing.assert_close(fused.bias[3 * 8 + 8:3 * 8 + 16], fused.bias[8:16], rtol=0, atol=0)


def test_phi3_fused_views_match_the_stock_split():
    """Phi-3: qkv_proj is [q (4 heads) | k (2) | v (2)] and gate_up_proj [gate | up]; the views are
    slices of the stored weights (writes land there)."""
    model = tiny_family_model("phi3")
    adapter = get_adapter(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q, (k, v) = adapter.query_proj(0), adapter.key_value_projs(0)
    assert (q.out_features, k.out_features, v.out_features) == (32, 16, 16)
    torch.testing.assert_close(v.weight, attn.qkv_proj.weight[48:], rtol=0, atol=0)
    gate, up = adapter.mlp_in_projs(0)
    x = torch.randn(5, 32)
    with torch.no_grad():
        stock_gate, stock_up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        torch.testing.assert_close(x @ gate.weight.T, stock_gate)
        torch.testing.assert_close(x @ up.weight.T, stock_up)
        up.weight[3, 5] = 7.0
    assert mlp.gate_up_proj.weight[64 + 3, 5] == 7.0


def _hand_plan(family, heads, kv_heads, neurons):
    """The same heads and neurons kept in both layers of a tiny model, no correction."""
    from stat_core.surgery.plan import LayerPlan, PrunePlan

    return PrunePlan(model=family, method="stat", mode="one-shot", budget={}, calibration={}, layers=[
        LayerPlan(layer=i, num_heads=4, num_kv_heads=_KV_HEADS.get(family, 4), intermediate_size=64,
                  kept_heads=heads, kept_kv_heads=kv_heads, kept_neurons=neurons) for i in range(2)])


@pytest.mark.parametrize("family, heads, kv_heads", [
    ("gpt_neox", [1, 3], [1, 3]),
    ("phi3", [2, 3], [1]),      # one whole KV group and both its query heads
    ("phi3", [0, 3], [0, 1]),   # one query head in each group
])
def test_hand_picked_heads_and_neurons_equal_masked_dense(family, heads, kv_heads, windows):
    """The fused slicing by hand: pruned model == dense model with the removed heads' and neurons'
    output columns zeroed (GPT-NeoX: whole interleaved 3·head_size blocks; Phi-3: q rows, the kept
    groups' k and v rows, and the same neurons out of both halves of gate_up_proj)."""
    model = tiny_family_model(family)
    neurons = list(range(0, 64, 3))
    plan = _hand_plan(family, heads, kv_heads, neurons)
    masked = mask_units(model, plan)
    apply_plan_(model, plan, stats=None)
    adapter = get_adapter(model)
    assert adapter.layer_shape(0) == adapter.layer_shape(1)
    shape = adapter.layer_shape(0)
    assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (2, len(kv_heads), len(neurons))
    torch.testing.assert_close(_logits(model, windows), _logits(masked, windows), rtol=1e-4, atol=1e-5)
    if family == "phi3":  # the per-layer config view: shared fields still shared, the model's own count untouched
        assert model.config.num_attention_heads == 4
        assert adapter.attention(0).config.sliding_window is model.config.sliding_window
        clone = copy.deepcopy(model)
        assert clone.model.layers[0].self_attn.config._stat_base is clone.config
        torch.testing.assert_close(_logits(clone, windows), _logits(masked, windows), rtol=1e-4, atol=1e-5)
        model.set_attn_implementation("eager")
        assert adapter.attention(0).config._attn_implementation == "eager"
        torch.testing.assert_close(_logits(model, windows), _logits(masked, windows), rtol=1e-4, atol=1e-5)


def test_phi3_refuses_heads_that_break_the_kv_groups():
    model = tiny_family_model("phi3")
    bad = _hand_plan("phi3", [0, 1, 2], [0, 1], list(range(64)))
    with pytest.raises(ValueError, match="same, non-zero number of query heads"):
        apply_plan_(model, bad, stats=None)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_eager_and_sdpa_calibration_agree(family, windows):
    """Layer-by-layer calibration replays every argument a block got, positional ones too: GPT-2
    hands its blocks the causal mask positionally, and under ``eager`` attention that mask is the
    only causality (``sdpa`` gets None and is causal by itself). Both give the same statistics, and
    the eager blocks run one by one reproduce the eager model's own hidden states."""
    stats = {}
    for impl in ("sdpa", "eager"):
        model = tiny_family_model(family, attn_implementation=impl)
        assert model.config._attn_implementation == impl
        adapter = get_adapter(model)
        runner = LayerwiseRunner(model, adapter, windows, batch_size=4)
        hidden, stats[impl] = runner.hidden, []
        for layer in range(adapter.num_layers):
            block_stats, hidden = runner.collect_block(layer, hidden)
            stats[impl].append(block_stats)
        with torch.no_grad():
            torch.testing.assert_close(_final_norm(model)(torch.cat(hidden)),
                                       _base(model)(input_ids=windows).last_hidden_state, rtol=1e-4, atol=1e-5)
    for sdpa, eager in zip(stats["sdpa"], stats["eager"]):
        torch.testing.assert_close(eager.attn_gram, sdpa.attn_gram, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eager.mlp_gram, sdpa.mlp_gram, rtol=1e-5, atol=1e-5)


# --- conformance: every supported family, one description each ------------------------------------

def _tiny_any(model_type: str):
    """A tiny random model of ``model_type``: the one table of test configs, keyed like the family list."""
    from conftest import tiny_model
    from test_encoders import tiny_classifier

    builders = {"llama": lambda: tiny_model("llama"), "mistral": lambda: tiny_model("mistral"),
                "qwen2": lambda: tiny_model("qwen2"), "qwen3": lambda: tiny_model("qwen3"),
                "gemma3_text": lambda: tiny_model("gemma3"),
                "bert": lambda: tiny_classifier("bert"), "roberta": lambda: tiny_classifier("roberta"),
                "distilbert": lambda: tiny_classifier("distilbert"),
                **{f: (lambda f=f: tiny_family_model(f)) for f in NEW_FAMILIES}}
    if model_type in builders:
        return builders[model_type]()
    try:  # a decoder family: its tiny config in tests/conftest.py::tiny_config
        return tiny_model(model_type)
    except ValueError:
        pytest.fail(f"family {model_type!r} has no tiny test config (tests/conftest.py::tiny_config)")


@pytest.mark.parametrize("model_type", supported_model_types())
def test_every_family_conforms_to_its_description(model_type):
    from stat_core.adapters.modeling_stat import LAYOUTS
    from stat_core.adapters.registry import FAMILIES, is_encoder
    from stat_core.export.gguf import gguf_problem

    family = FAMILIES[model_type]
    model = _tiny_any(model_type)
    assert model.config.model_type == model_type and model_type in LAYOUTS
    adapter = get_adapter(model)
    assert isinstance(adapter, family.adapter) and adapter.is_decoder == (not family.encoder) == (not is_encoder(model))
    problem = gguf_problem(model) or ""  # refused for the family itself, or (for GGUF families) not at all
    assert ("supports Llama-architecture" in problem or "holds causal language models" in problem) == (not family.gguf)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    # a plan that keeps everything is the identity; one that removes a neuron per layer changes the output
    result = stat_prune_(model, ids, PruneConfig(sparsity=0.0, sensitivity_samples=0, batch_size=2))
    assert all(len(lp.kept_neurons) == lp.intermediate_size for lp in result.plan.layers)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def _out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", supported_model_types())
def test_every_family_passes_the_property_battery(model_type, tmp_path):
    """From the family's record and its tiny config alone: a cut without correction equals the dense
    model with the removed units masked; a non-uniform export reloads with the same logits; cached and
    uncached greedy generation agree on the pruned decoder; a uniform export loads in stock
    transformers (no remote code) with the same logits."""
    from stat_core.adapters.registry import FAMILIES

    family = FAMILIES[model_type]
    model = _tiny_any(model_type)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(sparsity=0.7, sensitivity_samples=2, batch_size=2)
    pruned = copy.deepcopy(model)
    plan = stat_prune_(pruned, ids, config).plan
    assert any(len(lp.kept_heads) < lp.num_heads for lp in plan.layers), "the battery needs a removed head"
    assert any(len(lp.kept_neurons) < lp.intermediate_size for lp in plan.layers)

    cut = copy.deepcopy(model)
    apply_plan_(cut, plan, stats=None)
    torch.testing.assert_close(_out(cut, ids), _out(mask_units(model, plan), ids), rtol=1e-4, atol=1e-5)

    info = export_pruned(pruned, None, tmp_path / "layers", plan=plan)
    reloaded, _ = load_pruned(info.path)
    torch.testing.assert_close(_out(reloaded, ids), _out(pruned, ids), rtol=0, atol=0)

    if not family.encoder:
        prompt = ids[:1, :5]
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            cached = pruned.generate(prompt, use_cache=True, **kwargs)
            uncached = pruned.generate(prompt, use_cache=False, **kwargs)
        assert cached.shape[1] == 13 and torch.equal(cached, uncached)

    uniform = copy.deepcopy(model)
    uniform_plan = stat_prune_(uniform, ids, PruneConfig(sparsity=0.3, uniform=True, sensitivity_samples=2,
                                                         batch_size=2)).plan
    info = export_pruned(uniform, None, tmp_path / "uniform", plan=uniform_plan)
    assert info.uniform and "modeling_stat.py" not in info.files
    stock = type(model).from_pretrained(info.path).eval()
    torch.testing.assert_close(_out(stock, ids), _out(uniform, ids), rtol=0, atol=0)
