"""benchmarks/early_bird_real_task.py's control and statistics: the random ticket keeps EarlyBERT's
sizes layer by layer at seeded random positions, and the paired comparison over seeds is the mean,
sample std and Student t interval of the per-seed differences (checked against scipy's
one-sample t test). The full run is docs/early_bird.md's."""

import importlib.util
import os
import statistics

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "early_bird_real_task.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("early_bird_real_task", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ticket():
    gen = torch.Generator().manual_seed(3)
    heads = torch.rand(6, 12, generator=gen) > 1 / 3
    heads[:, 0] = True  # every layer keeps a head
    return heads, torch.rand(6, 1536, generator=gen) > 0.4


def test_random_ticket_keeps_the_sizes_of_each_layer(script):
    ticket = _ticket()
    drawn = script.random_ticket(ticket, seed=0)
    for keep, rand in zip(ticket, drawn):
        assert rand.dtype == torch.bool and rand.shape == keep.shape
        assert torch.equal(rand.sum(1), keep.sum(1))
    # seeded: the same seed draws the same ticket, another seed another one
    assert all(torch.equal(a, b) for a, b in zip(drawn, script.random_ticket(ticket, seed=0)))
    assert not torch.equal(drawn[1], script.random_ticket(ticket, seed=1)[1])
    # positions at random: the FFN overlap with the ticket is near the chance rate, not all
    ffn, rand = ticket[1], drawn[1]
    overlap = float((ffn & rand).sum() / ffn.sum())
    assert abs(overlap - float(ffn.float().mean())) < 0.03


def test_random_ticket_refuses_masks_that_are_not_2d_bool(script):
    heads, ffn = _ticket()
    with pytest.raises(ValueError, match="2-D bool"):
        script.random_ticket((heads.float(), ffn), seed=0)
    with pytest.raises(ValueError, match="2-D bool"):
        script.random_ticket((heads[0], ffn), seed=0)


def test_paired_comparison_matches_a_one_sample_t_test(script):
    from scipy import stats

    a, b = [85.4, 84.7, 86.8, 90.0], [90.3, 90.3, 88.2, 89.0]
    got = script.paired(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    assert got["diffs"] == pytest.approx(diffs)
    assert got["mean"] == pytest.approx(statistics.fmean(diffs))
    assert got["std"] == pytest.approx(statistics.stdev(diffs))
    ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert got["ci95"] == pytest.approx([ci.low, ci.high])
    assert got["wins_ties_losses"] == [1, 0, 3]
    one = script.paired([1.0], [0.5])
    assert one["ci95"] is None and one["std"] == 0.0 and one["mean"] == pytest.approx(0.5)
