"""The lean training engine: one loop, RLHF stages as plug-ins, data, rollout, checkpoints, CLI."""
