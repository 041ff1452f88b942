"""The research bench: baselines, the evidence report, evaluation and synthetic worlds (not the product path)."""
