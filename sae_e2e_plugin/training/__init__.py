"""Training: the runner config (``config``), building it from fields and flags (``fields``),
the objective registry (``objectives``), the trainer (``trainer``) and its phase-timing seam
(``timing``). Imports only ``core`` and the package's bottom-level modules."""
