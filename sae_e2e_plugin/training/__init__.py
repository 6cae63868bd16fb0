"""Training, in three places and two shared modules. Imports only ``core`` and the package's
bottom-level modules.

- ``config``: the run's config (``E2ERunnerConfig``, ``E2EMultiRunnerConfig``), its fields'
  types, shapes and numbers checked, and building it from fields, files and flags;
- ``loop``: the training loop (``E2ETrainer``, one per run; an ``E2ESAETrainer`` per SAE), the
  step pass, the phase schedule, the training log, checkpoints and resume;
- ``parallel``: torchrun's process group and the data-parallel rules;
- ``objectives``: the objective registry (read by ``config`` and by the step pass);
- ``timing``: the seam that names a step's phases for benchmarks.
"""
