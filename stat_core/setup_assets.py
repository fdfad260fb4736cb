"""``python -m stat_core.setup_assets``: convert the demo model and clean the text sample once."""

from __future__ import annotations

import logging

from stat_core.data.sources import wikipedia_articles
from stat_core.models import DEMO_MODELS, prepare_demo_model


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    articles = wikipedia_articles()
    print(f"Wikipedia sample: {len(articles)} articles cached")
    for name in DEMO_MODELS:
        print(f"demo model {name}: {prepare_demo_model(name)}")


if __name__ == "__main__":
    main()
