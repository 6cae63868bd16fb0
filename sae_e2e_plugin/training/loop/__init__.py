"""The training loop: ``E2ETrainer`` (``trainer``) drives one ``E2ESAETrainer`` per SAE
(``sae_trainer``) through the step pass (``step_pass``) on the phase schedule (``schedule``),
writing the training log (``training_log``) and checkpoints (``checkpoints``), and resuming
only the same run (``run_identity``)."""
