"""Model plumbing: running the frozen language model clean and spliced (``splice``) and the
pure loss functions of the objectives (``losses``). Imports nothing else of the package."""
