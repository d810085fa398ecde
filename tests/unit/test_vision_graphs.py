"""Crop-count buckets of the vision tower's CUDA graphs (the capture itself needs CUDA: see
benchmarks/exp_vision_graph.py and gpu_fastpath_check.py, which go through it)."""

import pytest
from tiny_phi3v import random_model

from phivision.generation.vision_graphs import VisionTowerGraphs, bucket_for, crop_buckets


def test_buckets_are_dense_then_every_eighth_and_end_at_the_maximum():
    buckets = crop_buckets(160)
    assert buckets[:32] == list(range(1, 33))
    assert buckets[32:] == list(range(40, 161, 8))
    assert crop_buckets(50) == [*range(1, 33), 40, 48, 50]  # the maximum itself is always a bucket
    assert crop_buckets(5) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("count, bucket", [(1, 1), (17, 17), (32, 32), (33, 40), (40, 40), (153, 160), (160, 160)])
def test_a_batch_runs_in_the_smallest_bucket_that_holds_it(count, bucket):
    assert bucket_for(count, crop_buckets(160)) == bucket


def test_a_batch_over_the_largest_bucket_has_none():
    assert bucket_for(161, crop_buckets(160)) is None


def test_graphs_need_a_cuda_tower(tmp_path):
    model = random_model(tmp_path)
    with pytest.raises(ValueError, match="CUDA"):
        VisionTowerGraphs(model.vision_tower, 8)
