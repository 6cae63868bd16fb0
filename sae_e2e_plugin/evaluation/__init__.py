"""The paper's evaluation metrics: what they are (``metrics``) and how an SAE spliced into its
model is measured on held-out tokens (``evaluate``). Imports only ``core``."""
