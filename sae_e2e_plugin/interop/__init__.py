"""Other formats and the Hugging Face Hub: the reference implementation's checkpoints
(``reference``, ``reference_hub``) and pretrained SAEs as starting points and uploads (``hub``)."""
