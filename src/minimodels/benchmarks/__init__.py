"""One module per kernel, each with ``run(shape=None, device="cpu", dtype=None) -> str``: the
kernel timed against its reference and its peers, as a Markdown table.
``python -m minimodels.bench <name>`` calls ``minimodels.benchmarks.<name>.run``."""
