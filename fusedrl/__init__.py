"""fusedrl: a lean RLHF post-training engine built on fused kernels.

Packages, lower never importing higher (docs/architecture.md; tests/test_layering.py checks it):

    kernels            fused ops, usable alone (torch only)
    packing            C++ packing core (fusedrl._C) with a pure-Python fallback
    config             the typed run config, TOML in and out
    models, data       packed forward for HF causal LMs and scalar heads; records, tokenization, packed batches
    rollout            the Sampler interface and its backends, verifiers and reward-model scoring, experience
    stages             sft, reward_model, rejection, dpo, policy_gradient, ppo (each with its config)
    train              the loop, checkpoints, metrics, run assembly
    cli                the `fusedrl` command; demo and bench sit on top and nothing in the core imports them
"""

__version__ = "0.1.0"
