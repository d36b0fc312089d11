"""`sample_rollout_divided` under a gloo process group of 2: every rank gets the one-process rollout."""
import torch
import torch.distributed as dist

from fusedrl.rollout.completions import make_sampler, sample_rollout_divided
from fusedrl.rollout.sampling import SamplingParams
from tests.distributed import _dist_helpers as h
from tests.helpers import rl_tiny as T

CALLS = {"uneven": [6, 1, 4, 3, 0], "one prompt (rank 1 samples nothing)": [2]}


def _rollouts(scored: list):
    """Each call's rollout and this rank's share; `scored` collects the sizes `score` was called on."""
    tok = T.tokenizer()
    policy = T.tiny_policy(tok, seed=1)
    sampler = make_sampler("native", policy, tok, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(n=3, max_new_tokens=5)
    source = T.rewards()

    def score(part):
        scored.append(len(part))
        part.rewards = source(part, T.records()).float()

    out = {}
    for name, indices in CALLS.items():
        rollout, mine = sample_rollout_divided(sampler, tok, T.records(), indices, params, score)
        out[name] = (rollout.completion_ids, rollout.record_index, rollout.rewards, mine)
    return out


def _worker(rank, world, port, out_dir):
    h.setup_rank(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    scored = []
    got = _rollouts(scored)
    torch.save({"got": got, "scored": scored}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_sample_their_shares_and_all_get_the_one_process_rollout(tmp_path):
    scored = []
    want = _rollouts(scored)
    assert scored == [15, 3]
    h.spawn(_worker, 2, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["scored"] for r in ranks] == [[9, 3], [6]]  # each rank scored only its share; rank 1's empty one skipped
    for name in CALLS:
        for r, shares in zip(ranks, ([3, 1], [2, 0])):
            ids, index, rewards, mine = r["got"][name]
            assert ids == want[name][0] and index == want[name][1], name
            torch.testing.assert_close(rewards, want[name][2], atol=0, rtol=0)
            assert mine == shares[list(CALLS).index(name)], name
    assert len({tuple(c) for c in want["uneven"][0]}) > 3  # sampled, not one repeated completion
