"""The default calibration follows the model: one rule (stat_core.data.recipe) for the CLI, the app
and the setup; anything the user names wins; parts that cannot apply are dropped and said."""

import copy
import json

import pytest

from conftest import tiny_model
from stat_core.data.recipe import resolve_recipe


@pytest.fixture(scope="module")
def chat_tokenizer():
    from transformers import AutoTokenizer

    from stat_core.models import prepare_demo_model

    return AutoTokenizer.from_pretrained(prepare_demo_model("smollm2-135m"))


@pytest.fixture(scope="module")
def plain_tokenizer(chat_tokenizer):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = None
    return tok


def test_a_chat_model_gets_the_chat_recipe(chat_tokenizer):
    r = resolve_recipe(tiny_model(), chat_tokenizer)
    assert (r.kind, r.source, r.sensitivity_labels, r.correct_on) == ("chat", "mix", "model", "wikipedia")
    assert "chat template" in r.sentence and "--calibration wikipedia" in r.sentence


def test_a_decoder_without_a_chat_template_gets_the_in_context_recipe(plain_tokenizer):
    r = resolve_recipe(tiny_model(), plain_tokenizer)
    assert (r.kind, r.source, r.sensitivity_labels, r.correct_on) == ("in-context", "in-context", "model", "wikipedia")


def test_an_encoder_keeps_its_labelled_text(chat_tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=128))
    r = resolve_recipe(bert, chat_tokenizer, labelled="movie-reviews")
    assert (r.kind, r.source, r.sensitivity_labels, r.correct_on) == ("labelled", "movie-reviews", "data", None)


def test_what_the_user_names_wins(chat_tokenizer):
    r = resolve_recipe(tiny_model(), chat_tokenizer, calibration="wikipedia")
    assert (r.source, r.sensitivity_labels, r.correct_on) == ("wikipedia", "data", None)  # the old default
    r = resolve_recipe(tiny_model(), chat_tokenizer, sensitivity_labels="data")
    assert (r.source, r.sensitivity_labels, r.correct_on) == ("mix", "data", "wikipedia")
    r = resolve_recipe(tiny_model(), chat_tokenizer, correct_on="in-context")
    assert r.correct_on == "in-context"


def test_parts_that_cannot_apply_are_dropped_and_said(chat_tokenizer):
    for kwargs in ({"one_shot": False}, {"whole_model": True}, {"single_process": False}):
        r = resolve_recipe(tiny_model(), chat_tokenizer, **kwargs)
        assert r.source == "mix" and r.correct_on is None and "corrections on the same text" in r.sentence, kwargs
    r = resolve_recipe(tiny_model(), chat_tokenizer, offload=True)
    assert (r.source, r.sensitivity_labels, r.correct_on) == ("wikipedia", "data", None) and "streamed" in r.sentence


def test_the_cli_states_the_recipe_and_records_it(tmp_path, capsys, plain_tokenizer):
    """A tiny Llama without a chat template (no chat text to generate: seconds): the first line says
    which calibration, the plan, report and model card record it, and the corrections were fitted on
    Wikipedia while the units were chosen on the in-context text."""
    from stat_core.cli import main

    folder = tmp_path / "tiny"
    tiny_model(vocab_size=len(plain_tokenizer), max_position_embeddings=512).save_pretrained(folder)
    plain_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([str(folder), "--sparsity", "0.3", "--num-samples", "4", "--seq-len", "64", "--skip-eval",
                 "--out", str(out)]) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("Calibration:")]
    assert lines and lines[0].startswith("Calibration: the in-context recipe"), lines
    calibration = json.loads((out / "plan.json").read_text())["calibration"]
    assert calibration["source"] == "in-context" and calibration["recipe"] == lines[0]
    assert calibration["corrections_fitted_on"]["source"] == "wikipedia"
    assert "the in-context recipe" in (out / "README.md").read_text()
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["calibration"]["recipe"] == lines[0]
