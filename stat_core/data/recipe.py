"""Which calibration a model gets when the user names none: the default follows the model.

A person who prunes an instruct model wants an instruct model back. Measured on SmolLM2-135M-Instruct
(docs/experiments.md, three window seeds): choosing the units on the model's own chat answers with
its own Fisher and fitting the corrections on Wikipedia keeps few-shot, analogy and chat behaviour
far better than Wikipedia alone, for a few percent of Wikipedia perplexity. So:

- a decoder with a chat template gets the **chat recipe**: units chosen on ``mix`` (half its own
  sampled chat answers to the project's seed prompts, half Wikipedia) with sensitivity labels sampled
  from the model (``model``), corrections fitted on ``wikipedia``;
- a decoder without one gets the **in-context recipe**: units chosen on the project's few-shot text
  (``in-context``) with the model's own labels, corrections fitted on ``wikipedia``;
- an encoder keeps its labelled examples.

Anything the user names wins: ``--calibration wikipedia`` (or any source) gives exactly that text with
data labels and corrections on the same text, as before. Where a part cannot apply (layer-wise modes
and whole-model methods refit or rotate on one text; torchrun; ``--offload`` never holds the model to
generate) the recipe says what it dropped. :func:`resolve_recipe` is the one rule the CLI, the app,
the setup and the benchmarks call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from stat_core.adapters.registry import is_encoder
from stat_core.data.chat import has_chat_template


@dataclass(frozen=True)
class Recipe:
    kind: str                 # "chat", "in-context", "labelled", "as asked", "streamed"
    source: str               # built-in text name or file the units are chosen on
    sensitivity_labels: str   # "data" or "model"
    correct_on: str | None    # the text the corrections are fitted on (None: the same text)
    sentence: str             # what the user is told

    def as_dict(self) -> dict:
        return asdict(self)


CHAT = ("mix", "model", "wikipedia")
IN_CONTEXT = ("in-context", "model", "wikipedia")


def resolve_recipe(model, tokenizer, calibration: str | None = None, sensitivity_labels: str | None = None,
                   correct_on: str | None = None, *, one_shot: bool = True, single_process: bool = True,
                   whole_model: bool = False, offload: bool = False, labelled: str = "newsgroups") -> Recipe:
    """The calibration for ``model``: the default that follows the model, with whatever the user named
    (``calibration``, ``sensitivity_labels``, ``correct_on``; None: not named) in its place."""
    if is_encoder(model):
        return Recipe("labelled", labelled, sensitivity_labels or "data", None,
                      f"Calibration: the labelled examples of '{labelled}' (a classifier).")
    if calibration is not None:
        labels = sensitivity_labels or "data"
        sentence = (f"Calibration: '{calibration}' as asked, sensitivity labels from the "
                    f"{'text' if labels == 'data' else 'model'}"
                    + (f", corrections fitted on '{correct_on}'." if correct_on else "."))
        return Recipe("as asked", calibration, labels, correct_on, sentence)
    if offload:
        return Recipe("streamed", "wikipedia", "data", None,
                      "Calibration: Wikipedia (streamed pruning never holds the whole model, so it cannot write the "
                      "chat text the default for chat models needs).")
    chat = has_chat_template(tokenizer)
    source, labels, fit = CHAT if chat else IN_CONTEXT
    labels = sensitivity_labels or labels
    dropped = ""
    if correct_on is not None:
        fit = correct_on
    elif not one_shot or whole_model or not single_process:
        why = ("layer-wise modes refit each correction on the calibration text" if not one_shot else
               "this method fits everything on one text" if whole_model else "torchrun runs one text")
        fit, dropped = None, f" (corrections on the same text: {why})"
    if chat:
        sentence = ("Calibration: the chat recipe, because this model has a chat template — units chosen on 'mix' "
                    "(half its own chat answers, half Wikipedia) with its own Fisher, corrections fitted on "
                    f"'{fit or 'mix'}'{dropped}. `--calibration wikipedia` gives plain Wikipedia.")
    else:
        sentence = ("Calibration: the in-context recipe, because this model has no chat template — units chosen on "
                    "the project's few-shot text ('in-context') with its own Fisher, corrections fitted on "
                    f"'{fit or 'in-context'}'{dropped}. `--calibration wikipedia` gives plain Wikipedia.")
    return Recipe("chat" if chat else "in-context", source, labels, fit, sentence)
