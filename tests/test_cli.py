"""The CLI end to end on a tiny random model that uses the demo model's real tokenizer."""

import json

import pytest
import torch

from conftest import tiny_model
from stat_core.cli import main
from stat_core.models import prepare_demo_model

# The evaluation suite's fields, before and after (KL and chat agreement compare with dense: after only).
SUITE_KEYS = {"perplexity_before", "perplexity_after", "kl_to_dense_after", "fewshot_accuracy_before",
              "fewshot_accuracy_after", "fewshot_bias_free_before", "fewshot_bias_free_after",
              "fewshot_majority_share_before", "fewshot_majority_share_after", "analogy_accuracy_before",
              "analogy_accuracy_after", "instruction_agreement_after", "instruction_kl_after"}
REPORT_KEYS = {"model", "sparsity_target", "block_params_before", "block_params_after", "params_before",
               "params_after", "calibration_tokens", "seconds_prune", "device", "layers"} | SUITE_KEYS


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prepare_demo_model("smollm2-135m"))
    model = tiny_model("llama", vocab_size=len(tok))
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_prunes_and_reports(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([str(tiny_folder), "--sparsity", "0.3", "--out", str(out), "--num-samples", "4", "--seq-len", "64",
               "--sensitivity-samples", "2", "--quiet", "--measure-floor", "--quick-eval",
               "--calibration", "wikipedia"])  # the chat recipe's generation: test_cli_calibrates_on_the_models_own_chat
    assert rc == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert "kl_to_dense_before" not in report and "instruction_agreement_before" not in report
    assert report["kl_to_dense_after"] > 0 and report["instruction_kl_after"] > 0
    assert abs(report["block_params_removed_fraction"] - 0.3) < 0.01
    assert report["block_params_after"] < report["block_params_before"]
    assert report["calibration_tokens"] == 4 * 64
    assert [l["neurons"] for l in report["layers"]] == [len(l["kept_neurons"]) for l in
                                                         json.loads((out / "plan.json").read_text())["layers"]]
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["no-correction", "magnitude"])
def test_cli_baselines(tiny_folder, tmp_path, method):
    out = tmp_path / method
    rc = main([str(tiny_folder), "--sparsity", "0.2", "--out", str(out), "--num-samples", "4", "--seq-len", "64",
               "--sensitivity-samples", "0", "--quiet", "--skip-eval", "--method", method, "--mode", "propagate"])
    assert rc == 0
    assert json.loads((out / "pruning_report.json").read_text())["method"] == method


def _error_of(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    return err


def test_unknown_method_lists_the_methods(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tiny_folder), "--sparsity", "0.2", "--out", str(tmp_path / "x"), "--method", "sparsegpt"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "sparsegpt" in err
    for name in ("stat", "flap", "wanda-sp", "slimgpt", "llm-pruner", "slicegpt"):
        assert name in err
    assert not (tmp_path / "x").exists()


def test_method_that_cannot_apply_says_so_before_any_work(tiny_bert_folder, tmp_path, capsys):
    err = _error_of([str(tiny_bert_folder), "--sparsity", "0.2", "--out", str(tmp_path / "x"), "--method", "slicegpt",
                     "--no-model"], capsys)
    line = next(l for l in err.splitlines() if l.startswith("stat-prune: error:"))
    assert "decoder language models only" in line and line.endswith("encoder")


def test_slicegpt_needs_no_model(tiny_folder, tmp_path, capsys):
    err = _error_of([str(tiny_folder), "--sparsity", "0.2", "--out", str(tmp_path / "x"), "--method", "slicegpt"], capsys)
    assert "--no-model" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["flap", "wanda-sp", "slimgpt", "llm-pruner", "slicegpt"])
def test_cli_runs_every_peer(tiny_folder, tmp_path, method):
    out = tmp_path / method
    rc = main([str(tiny_folder), "--sparsity", "0.3", "--out", str(out), "--num-samples", "4", "--seq-len", "64",
               "--sensitivity-samples", "2", "--quiet", "--skip-eval", "--no-model", "--method", method])
    assert rc == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["method"] == method and abs(report["block_params_removed_fraction"] - 0.3) < 0.03


def test_missing_model_folder(tmp_path, capsys):
    err = _error_of(["./no/such/folder", "--sparsity", "0.2", "--out", str(tmp_path / "x")], capsys)
    assert "does not exist" in err


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    err = _error_of([str(tmp_path / "m"), "--sparsity", "0.2", "--out", str(tmp_path / "x")], capsys)
    assert "no config.json" in err


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import BloomConfig, BloomForCausalLM  # (GPT-2, the earlier example, is supported now)

    BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "bloom")
    err = _error_of([str(tmp_path / "bloom"), "--sparsity", "0.2", "--out", str(tmp_path / "x")], capsys)
    assert "'bloom' is not supported" in err and "llama" in err


def test_existing_output_is_not_overwritten(tiny_folder, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _error_of([str(tiny_folder), "--sparsity", "0.2", "--out", str(out)], capsys)
    assert "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_when_complete(tiny_folder, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "pruning_report.json").write_text("{}")  # a folder this tool wrote: the only kind --overwrite replaces
    rc = main([str(tiny_folder), "--sparsity", "0.2", "--out", str(out), "--num-samples", "2", "--seq-len", "32",
               "--sensitivity-samples", "0", "--quiet", "--skip-eval", "--overwrite"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert "old.txt" not in names and {"plan.json", "pruning_report.json", "model.safetensors"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary folders left behind


def test_too_short_calibration_text(tiny_folder, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    err = _error_of([str(tiny_folder), "--sparsity", "0.2", "--out", str(tmp_path / "x"), "--calibration", str(text),
                     "--skip-eval"], capsys)
    assert "beyond the model's 128 positions" in err   # the default 512-token windows do not fit this model
    err = _error_of([str(tiny_folder), "--sparsity", "0.2", "--out", str(tmp_path / "x"), "--calibration", str(text),
                     "--skip-eval", "--seq-len", "64"], capsys)
    assert "fewer than one window" in err
    assert not (tmp_path / "x").exists()


def test_impossible_budget(tiny_folder, tmp_path, capsys):
    err = _error_of([str(tiny_folder), "--sparsity", "0.97", "--out", str(tmp_path / "x"), "--num-samples", "2",
                     "--seq-len", "32", "--skip-eval", "--sensitivity-samples", "0"], capsys)
    assert "allows at most" in err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from stat_core.models import _minilm_source

    tok = AutoTokenizer.from_pretrained(_minilm_source())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=2))
    path = tmp_path_factory.mktemp("tinybert")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_encoder_reports_accuracy(tiny_bert_folder, tmp_path):
    data = tmp_path / "reviews.jsonl"
    import json as _json

    from stat_core.data.labelled import movie_reviews

    mr = movie_reviews()
    data.write_text("\n".join(_json.dumps({"text": t, "label": ["neg", "pos"][y]}) for t, y in zip(mr.texts, mr.labels)))
    out = tmp_path / "enc"
    rc = main([str(tiny_bert_folder), "--sparsity", "0.3", "--out", str(out), "--labelled", str(data),
               "--seq-len", "48", "--quiet", "--budget", "flops"])
    assert rc == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["kind"] == "encoder-classifier"
    assert {"accuracy_before", "accuracy_after"} <= set(report) and "perplexity_before" not in report
    assert abs(report["block_flops_removed_fraction"] - 0.3) < 0.01
    assert report["calibration"]["held_out_examples"] == 100


@pytest.mark.parametrize("uniform", [False, True])
def test_cli_out_folder_is_a_loadable_model(tiny_folder, tmp_path, uniform):
    from transformers import AutoModelForCausalLM

    from stat_core.export.hf import load_pruned

    out = tmp_path / "model"
    rc = main([str(tiny_folder), "--sparsity", "0.3", "--out", str(out), "--num-samples", "4", "--seq-len", "64",
               "--sensitivity-samples", "0", "--quiet", "--skip-eval"] + (["--uniform"] if uniform else []))
    assert rc == 0
    report = json.loads((out / "pruning_report.json").read_text())
    same_shapes = len({(l["heads"], l["kv_heads"], l["neurons"]) for l in report["layers"]}) == 1
    assert report["export"]["uniform"] is same_shapes and (same_shapes or not uniform)
    assert report["size_on_disk_after_bytes"] < report["size_on_disk_before_bytes"]
    model, tokenizer = load_pruned(out)
    ids = tokenizer("The cat sat on", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    if uniform:  # the portable form: stock transformers, no custom code
        stock = AutoModelForCausalLM.from_pretrained(out)
        assert torch.equal(stock.generate(ids, max_new_tokens=5, do_sample=False), expected)
    assert (out / "modeling_stat.py").exists() is not same_shapes


def test_cli_no_model_writes_only_the_report(tiny_folder, tmp_path):
    out = tmp_path / "report-only"
    rc = main([str(tiny_folder), "--sparsity", "0.2", "--out", str(out), "--num-samples", "2", "--seq-len", "32",
               "--sensitivity-samples", "0", "--quiet", "--skip-eval", "--no-model"])
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["plan.json", "pruning_report.json"]


def test_cli_calibrates_on_the_models_own_chat(tiny_folder, tmp_path, monkeypatch):
    """--calibration mix: half the windows are the model's own chat transcripts (generated once,
    cached); --sensitivity-labels model reaches the prune config."""
    from stat_core.data import mix as calibration_mix

    seeds = calibration_mix.seed_prompts()[:4]  # 4 of the 128: seconds, not minutes, on a tiny model
    monkeypatch.setattr(calibration_mix, "seed_prompts", lambda path=None: seeds)
    out = tmp_path / "run"
    rc = main([str(tiny_folder), "--sparsity", "0.2", "--out", str(out), "--num-samples", "4", "--seq-len", "64",
               "--sensitivity-samples", "2", "--quiet", "--quick-eval", "--no-model", "--calibration", "mix",
               "--sensitivity-labels", "model"])
    assert rc == 0
    report = json.loads((out / "pruning_report.json").read_text())
    calib = report["calibration"]
    assert calib["source"] == "mix" and calib["self_generated_windows"] == 2 and calib["wikipedia_windows"] == 2
    assert calib["transcripts"] == 4 and calib["seed_prompts"] == 4 and calib["generation_seconds"] >= 0.0


def test_cli_fits_the_corrections_on_another_text(tiny_folder, tmp_path, capsys):
    """--correct-on: the units are chosen on --calibration's text (the same plan as without it), the
    corrections fitted on the second text (other weights); the report names both texts. Refused in one
    sentence where it cannot apply, before anything is written."""
    from safetensors.torch import load_file

    common = [str(tiny_folder), "--sparsity", "0.3", "--num-samples", "4", "--seq-len", "64",
              "--sensitivity-samples", "2", "--quiet", "--skip-eval", "--calibration", "in-context"]
    assert main([*common, "--out", str(tmp_path / "own")]) == 0
    assert main([*common, "--out", str(tmp_path / "wiki"), "--correct-on", "wikipedia"]) == 0
    report = json.loads((tmp_path / "wiki" / "pruning_report.json").read_text())
    assert report["calibration"]["source"] == "in-context"
    assert report["calibration"]["corrections_fitted_on"]["source"] == "wikipedia"
    assert "correction_calibration" in report["seconds_prune_stages"]
    plans = [json.loads((tmp_path / run / "plan.json").read_text())["layers"] for run in ("own", "wiki")]
    assert plans[0] == plans[1]
    own, wiki = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("own", "wiki"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert own[name].shape == wiki[name].shape and not torch.equal(own[name], wiki[name])
    err = _error_of([*common, "--out", str(tmp_path / "x"), "--correct-on", "wikipedia", "--mode", "propagate"], capsys)
    assert "--correct-on fits one-shot corrections" in err and "--mode propagate" in err
    assert not (tmp_path / "x").exists()
