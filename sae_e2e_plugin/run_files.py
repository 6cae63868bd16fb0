"""The files a run writes into its folders, named in one place.

``output_path`` holds the exported SAE (SAELens' ``cfg.json`` + ``sae_weights.safetensors``),
``EVAL_FILENAME`` and ``TRAINING_LOG_FILENAME``; each checkpoint folder holds SAELens'
trainer state plus ``TRAINER_STATE_FILENAME``. Training writes these files; analysis and
sweeps read them, so both sides take the names from here.
"""

EVAL_FILENAME = "eval.json"
"""The final evaluation on held-out tokens (``EvalResult.to_dict()``); marks a finished run."""

TRAINING_LOG_FILENAME = "training_log.jsonl"
"""One JSON line per training step: step, tokens, each loss term, the batch's L0."""

TRAINER_STATE_FILENAME = "e2e_trainer_state.json"
"""In a checkpoint: the token-stream position and step count that resume needs."""
