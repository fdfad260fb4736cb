"""The benchmark scripts, one question each, run as modules from the repository root over the
library's public API: ``.venv/bin/python -m benchmarks.<name> [--quick | --tiny] ...``
(``benchmarks/README.md`` lists them). ``_common`` holds their shared helpers and ``tp_peer`` the
Torch-Pruning peer that ``quality`` uses; neither is a benchmark of its own."""
