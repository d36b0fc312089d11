"""A dense test verifier for the GRPO run of test_train_cli (varied rewards, so the step has a gradient)."""


def vowel_share(prompt: str, completion: str, **fields) -> float:
    return sum(c in "aeiou" for c in completion) / max(len(completion), 1)
