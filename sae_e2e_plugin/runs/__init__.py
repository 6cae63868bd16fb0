"""Whole runs: one training run with evaluation and export (``runner``) and grids of runs
(``sweep``). Everything below is passed in resolved; the command line sits on top."""
