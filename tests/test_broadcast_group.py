"""How a state is cut into broadcast buckets (the broadcast itself runs in the Ray tests)."""

import torch

from raydraft_ray.broadcast_group import plan_buckets


def test_buckets_hold_one_dtype_each_and_respect_the_size_limit():
    state = {
        "a": torch.zeros(100),  # 400 bytes
        "b": torch.zeros(10, dtype=torch.bfloat16),
        "c": torch.zeros(100),
        "d": torch.zeros(1000),  # larger than a bucket: alone
        "e": torch.zeros(3, 2),
        "step": torch.tensor(7),
    }
    buckets = plan_buckets(state, bucket_bytes=1000)
    assert [[s.name for s in b] for b in buckets] == [["a", "c"], ["d"], ["e"], ["b"], ["step"]]
    assert buckets[2][0].shape == (3, 2) and buckets[2][0].numel == 6
    assert buckets[4][0].shape == () and buckets[4][0].numel == 1
    assert {b[0].dtype for b in buckets} == {"float32", "bfloat16", "int64"}
    assert sorted(s.name for b in buckets for s in b) == sorted(state)
