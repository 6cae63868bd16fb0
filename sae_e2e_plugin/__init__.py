"""End-to-end sparse dictionary learning (Braun et al. 2024) for SAELens."""
