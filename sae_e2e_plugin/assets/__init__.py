"""Built-in assets that work offline: the bundled SmolLM2-135M (``model``), the corpora
(``corpora``), their on-disk cache (``cache``), and loading any run's language model (``models``)."""
