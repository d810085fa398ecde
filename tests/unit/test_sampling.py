"""Sampling is a pure function of logits and parameters."""

import pytest
import torch

from phivision.errors import PromptError
from phivision.generation.sampling import SamplingParams, make_generator, sample, warp_logits


def test_greedy_picks_argmax_per_row():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample(logits, SamplingParams()).tolist() == [1, 0]


def test_top_k_keeps_only_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    warped = warp_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(warped).tolist() == [[False, True, True, False]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    warped = warp_logits(probs.log(), SamplingParams(temperature=1.0, top_p=0.7))
    # 0.5 alone is under 0.7, 0.5 + 0.3 reaches it: the two best stay.
    assert torch.isfinite(warped).tolist() == [[True, True, False, False]]
    # The best token always survives, however small top_p is.
    warped = warp_logits(probs.log(), SamplingParams(temperature=1.0, top_p=0.01))
    assert torch.isfinite(warped).tolist() == [[True, False, False, False]]


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, 4.0]])
    assert torch.allclose(warp_logits(logits, SamplingParams(temperature=2.0)), torch.tensor([[1.0, 2.0]]))


def test_seeded_sampling_is_reproducible_and_in_support():
    torch.manual_seed(123)
    logits = torch.randn(4, 50)
    params = SamplingParams(temperature=0.8, top_k=5, seed=7)
    a = sample(logits, params, make_generator(7, "cpu"))
    b = sample(logits, params, make_generator(7, "cpu"))
    assert a.tolist() == b.tolist()
    top5 = logits.topk(5, dim=-1).indices
    assert all(int(t) in row.tolist() for t, row in zip(a, top5))


def test_sampled_frequencies_follow_probabilities():
    logits = torch.tensor([[0.0, 1.0]]).repeat(4000, 1)
    picks = sample(logits, SamplingParams(temperature=1.0), make_generator(0, "cpu"))
    expected = torch.tensor([0.0, 1.0]).softmax(-1)[1].item()
    assert abs(picks.float().mean().item() - expected) < 0.03


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-3), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop=("",)), "stop"),
        (dict(seed="x"), "seed"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, word):
    with pytest.raises(PromptError, match=word):
        SamplingParams(**kwargs)


def test_single_stop_string_is_accepted():
    assert SamplingParams(stop="END").stop == ("END",)
