"""Alignment: preference data, reward models (Bradley-Terry) and direct preference optimisation (the DPO family),
all trained through llmkit.train's one loop with their own objectives."""
