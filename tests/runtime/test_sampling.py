import math

import pytest
import torch

from llmc.runtime.sampling import make_generators, sample


def draws(logits, temperature, top_p, generators, steps):
    """[steps, B] tokens drawn step after step with the same generators."""
    return torch.stack([sample(logits, temperature, top_p, generators) for _ in range(steps)])


def assert_frequencies(tokens: torch.Tensor, probs: torch.Tensor):
    """Each token's count within 5 binomial standard deviations of n * p.

    The counts are Binomial(n, p); the tests keep n * p above ~50 so the normal approximation holds, and a
    5-sigma deviation has probability ~6e-7 per token, so a correct sampler essentially never fails, while a
    wrong distribution (say, no temperature) is off by many sigma at these sample sizes.
    """
    n = tokens.numel()
    counts = torch.bincount(tokens.flatten(), minlength=probs.numel()).double()
    for token, p in enumerate(probs.double().tolist()):
        bound = 5 * math.sqrt(n * p * (1 - p))
        assert abs(counts[token] - n * p) <= bound, f"token {token}: {counts[token]} draws, expected {n * p:.1f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(6, 50).to(dtype)
    generators = make_generators(0, list(range(6)))
    assert torch.equal(sample(logits, 0.0, 1.0, generators), logits.argmax(-1))
    assert torch.equal(sample(logits, 0.0, 0.5, None), logits.argmax(-1))


def test_tiny_top_p_is_argmax_at_any_temperature():
    logits = torch.randn(5, 80)
    generators = make_generators(1, list(range(5)))
    for temperature in (0.3, 1.0, 5.0):
        tokens = draws(logits, temperature, 1e-6, generators, steps=10)
        assert (tokens == logits.argmax(-1)).all()


def test_same_seed_same_draws_independent_of_batch():
    logits = torch.randn(4, 100)
    full = draws(logits, 0.9, 0.95, make_generators(3, [10, 11, 12, 13]), steps=25)
    assert torch.equal(full, draws(logits, 0.9, 0.95, make_generators(3, [10, 11, 12, 13]), steps=25))
    alone = draws(logits[1:2], 0.9, 0.95, make_generators(3, [11]), steps=25)
    assert torch.equal(alone[:, 0], full[:, 1])
    reordered = draws(logits[[3, 0]], 0.9, 0.95, make_generators(3, [13, 10]), steps=25)
    assert torch.equal(reordered, full[:, [3, 0]])
    # A different seed, or none, gives a different stream: 25 equal draws from ~100 tokens would be a fluke.
    assert not torch.equal(full, draws(logits, 0.9, 0.95, make_generators(4, [10, 11, 12, 13]), steps=25))
    unseeded = [draws(logits[:1], 1.0, 1.0, make_generators(None, [0]), steps=25) for _ in range(2)]
    assert not torch.equal(*unseeded)


def nucleus_logits():
    """Logits over 6 tokens with probabilities [.5, .3, .1, .05, .03, .02] at shuffled token ids."""
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    ids = torch.randperm(6)
    logits = torch.empty(6)
    logits[ids] = probs.log() + torch.randn(()) * 3  # a constant shift leaves the softmax unchanged
    return logits, ids, probs


@pytest.mark.parametrize("top_p, kept", [(0.7, 2), (0.85, 3), (0.93, 4)])
def test_tokens_outside_the_nucleus_are_never_drawn(top_p, kept):
    logits, ids, probs = nucleus_logits()
    n = 3000
    generators = make_generators(torch.randint(0, 2**31, ()).item(), list(range(n)))
    tokens = sample(logits.expand(n, 6), 1.0, top_p, generators)
    expected = torch.zeros(6)
    expected[ids[:kept]] = probs[:kept] / probs[:kept].sum()
    assert set(tokens.tolist()) == set(ids[:kept].tolist())
    assert_frequencies(tokens, expected)


def test_nucleus_is_taken_after_temperature():
    logits, ids, _ = nucleus_logits()
    # At T=0.5 the probabilities are ~[.71, .25, .03, ...]: the top token alone already reaches 0.7.
    tokens = sample(logits.expand(500, 6), 0.5, 0.7, None)
    assert (tokens == ids[0]).all()
    # At T=2 they flatten to ~[.34, .26, .15, ...]: three tokens are needed to reach 0.7.
    tokens = sample(logits.expand(2000, 6), 2.0, 0.7, None)
    assert set(tokens.tolist()) == set(ids[:3].tolist())


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_frequencies_follow_softmax(temperature):
    # Logits within [0, 2] keep every probability above ~1.5%, so n * p stays large for the binomial bound.
    logits = torch.rand(6) * 2
    n = 20000
    tokens = sample(logits.expand(n, 6), temperature, 1.0, None)
    assert_frequencies(tokens, torch.softmax(logits / temperature, -1))


def test_frequencies_follow_softmax_with_per_row_generators():
    logits = torch.rand(4) * 2
    n = 4000
    generators = make_generators(torch.randint(0, 2**31, ()).item(), list(range(n)))
    tokens = sample(logits.expand(n, 4), 1.0, 1.0, generators)
    assert_frequencies(tokens, torch.softmax(logits, -1))


def test_invalid_arguments_raise():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, -0.1, 1.0, None)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, float("nan"), 1.0, None)
    for top_p in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match="top_p"):
            sample(logits, 1.0, top_p, None)
    with pytest.raises(ValueError, match="generators"):
        sample(logits, 1.0, 1.0, make_generators(0, [0]))
    with pytest.raises(ValueError, match="batch, vocab"):
        sample(logits[0], 1.0, 1.0, None)
