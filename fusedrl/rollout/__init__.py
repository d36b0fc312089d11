"""Rollouts: the one Sampler interface (`fusedrl.rollout.sampling`) and its backends."""
