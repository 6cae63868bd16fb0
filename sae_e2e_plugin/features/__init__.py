"""Feature dashboards: one pass over a corpus keeps each feature's statistics and examples in
bounded memory (``stats``), and a static HTML site shows them (``site``); two dictionaries are
matched by decoder cosine (``compare``). ``inspect_sae`` in ``build`` ties them together."""
