"""A method's own settings: a frozen dataclass per method, carried by PruneConfig.settings, with one
CLI flag per field generated from the dataclass."""

import dataclasses

import pytest
import torch

from conftest import tiny_model
from stat_core.cli import build_parser, method_settings
from stat_core.config import PruneConfig
from stat_core.methods.llm_pruner import LLMPrunerSettings
from stat_core.methods.registry import get_method, method_names
from stat_core.methods.slimgpt import SlimGPTSettings
from stat_core.pipeline import calibrate, plan_pruning


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model(num_hidden_layers=4)
    windows = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))
    return model, windows, calibrate(model, windows, PruneConfig(sparsity=0.0))


def test_every_settings_field_has_a_cli_flag_with_its_default():
    text = build_parser().format_help()
    n_fields = 0
    for name in method_names():
        settings = get_method(name).Settings
        if settings is None:
            continue
        for field in dataclasses.fields(settings):
            assert f"--{name}-{field.name.replace('_', '-')}" in text
            n_fields += 1
    assert n_fields >= 15  # SlimGPT (2), LLM-Pruner (2), block movement (11)


def test_flags_become_the_chosen_methods_settings_and_others_are_refused():
    p = build_parser()
    args = p.parse_args(["m", "--sparsity", "0.3", "--out", "o", "--method", "slimgpt", "--slimgpt-percdamp", "0.05"])
    assert method_settings(args, "slimgpt") == SlimGPTSettings(percdamp=0.05)
    assert method_settings(p.parse_args(["m", "--sparsity", "0.3", "--out", "o"]), "stat") is None
    args = p.parse_args(["m", "--sparsity", "0.3", "--out", "o", "--llm-pruner-skip-first", "0"])
    assert method_settings(args, "llm-pruner") == LLMPrunerSettings(skip_first=0)
    with pytest.raises(ValueError, match="--llm-pruner-skip-first is a setting of --method llm-pruner, not of stat"):
        method_settings(args, "stat")
    args = p.parse_args(["m", "--sparsity", "0.3", "--out", "o", "--method", "slimgpt", "--slimgpt-percdamp", "-1"])
    with pytest.raises(ValueError, match="percdamp must be > 0"):
        method_settings(args, "slimgpt")


@pytest.mark.parametrize("method, flag, text", [("block-movement", "temperature", "nan"), ("slimgpt", "percdamp", "inf"),
                                                ("block-movement", "epochs", "inf"), ("llm-pruner", "skip-first", "nan")])
def test_settings_that_are_not_finite_numbers_are_refused(method, flag, text):
    """nan passes range checks written as comparisons and gave a NaN model with exit 0; inf ran into
    tracebacks: every float setting, from a flag, from text (the app) or built in code, must be finite."""
    from stat_core.methods.registry import get_method
    from stat_core.methods.settings import settings_from_text

    p = build_parser()
    args = p.parse_args(["m", "--sparsity", "0.3", "--out", "o", "--method", method, f"--{method}-{flag}", text]) \
        if flag != "skip-first" else None
    if args is not None:
        with pytest.raises(ValueError, match=f"{flag.replace('-', '_')} must be a finite number"):
            method_settings(args, method)
        with pytest.raises(ValueError, match="must be a finite number"):
            settings_from_text(method, f"{flag.replace('-', '_')}={text}")
    else:  # an int setting: not a whole number
        with pytest.raises(SystemExit):
            p.parse_args(["m", "--sparsity", "0.3", "--out", "o", f"--{method}-{flag}", text])
        with pytest.raises(ValueError, match="takes a whole number"):
            settings_from_text(method, f"skip_first={text}")
    if method == "slimgpt":
        config = PruneConfig(sparsity=0.3, method="slimgpt", settings=SlimGPTSettings(percdamp=float(text)))
        with pytest.raises(ValueError, match="finite"):
            get_method("slimgpt").check_config(config)


def test_default_settings_give_the_same_plan_as_none(calibrated):
    model, windows, calib = calibrated
    plain = plan_pruning(model, calib, PruneConfig(sparsity=0.3, method="slimgpt"))
    explicit = plan_pruning(model, calib, PruneConfig(sparsity=0.3, method="slimgpt", settings=SlimGPTSettings()))
    assert [lp.kept_neurons for lp in plain.layers] == [lp.kept_neurons for lp in explicit.layers]
    assert "settings" not in plain.budget and explicit.budget["settings"] == {"percdamp": 0.01, "first_to_last": 0.25}


def test_slimgpt_settings_change_its_schedule_and_ridge(calibrated):
    model, windows, calib = calibrated
    base = plan_pruning(model, calib, PruneConfig(sparsity=0.3, method="slimgpt"))
    flat = plan_pruning(model, calib, PruneConfig(sparsity=0.3, method="slimgpt",
                                                  settings=SlimGPTSettings(percdamp=0.2, first_to_last=1.0)))
    assert flat.correction_ridge == 0.2 and base.correction_ridge == 0.01
    ratios = flat.budget["layer_ratios"]
    assert max(ratios) - min(ratios) < 1e-9 < max(base.budget["layer_ratios"]) - min(base.budget["layer_ratios"])


def test_llm_pruner_skip_counts_choose_the_pruned_layers(calibrated):
    model, windows, calib = calibrated
    plan = plan_pruning(model, calib, PruneConfig(sparsity=0.2, method="llm-pruner",
                                                  settings=LLMPrunerSettings(skip_first=0, skip_last=0)), data=windows)
    assert plan.budget["pruned_layers"] == [0, 1, 2, 3]
    recipe = plan_pruning(model, calib, PruneConfig(sparsity=0.2, method="llm-pruner"), data=windows)
    assert recipe.budget["pruned_layers"] == [1, 2]


def test_settings_of_another_method_are_refused_in_one_sentence(calibrated):
    model, windows, calib = calibrated
    with pytest.raises(ValueError, match="SlimGPT takes SlimGPTSettings settings, got LLMPrunerSettings"):
        plan_pruning(model, calib, PruneConfig(sparsity=0.3, method="slimgpt", settings=LLMPrunerSettings()))
    with pytest.raises(ValueError, match="STAT takes StatSettings settings, got SlimGPTSettings"):
        plan_pruning(model, calib, PruneConfig(sparsity=0.3, settings=SlimGPTSettings()))
    with pytest.raises(ValueError, match="Wanda-sp has no settings of its own"):
        plan_pruning(model, calib, PruneConfig(sparsity=0.3, method="wanda-sp", settings=SlimGPTSettings()))


@pytest.mark.parametrize("method", [m for m in method_names() if get_method(m).Settings is not None])
def test_typed_controls_write_settings_text_that_reads_back(method):
    """What the app's typed controls give (numbers as floats, an empty number box as None) becomes
    ``name=value`` text that the settings parser reads back as the same settings; defaults write nothing."""
    from stat_core.methods.settings import setting_choices, setting_fields, setting_kind, settings_from_text, settings_text

    fields = setting_fields(method)
    assert settings_text(method, {f.name: f.default for f in fields}) == ""
    assert settings_text(method, {f.name: None for f in fields if f.default is None}) == ""
    changed = {}
    for f in fields:
        kind, choices = setting_kind(f), setting_choices(f)
        if kind is bool:
            changed[f.name] = not f.default
        elif choices:
            changed[f.name] = next(c for c in choices if c != f.default)
        elif kind is int:
            changed[f.name] = float((f.default or 0) + 2)  # a number box gives floats
        elif kind is float:
            changed[f.name] = (f.default or 0.0) / 2 + 0.01
    text = settings_text(method, changed)
    settings = settings_from_text(method, text)
    for name, value in changed.items():
        expected = int(value) if isinstance(value, float) and setting_kind(
            next(f for f in fields if f.name == name)) is int else value
        assert getattr(settings, name) == expected, (name, text)
