"""A reference rank's forwards (placement ranks), in process on the tiny model: requests of equal length share one
forward and every answer is bitwise what the request alone would get; requests of other lengths are not padded."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from dpo_dist.config.resources import DEFAULT_CHECKPOINT
from dpo_dist.config.schema import from_dict
from dpo_dist.reference.rank_server import Server, group_requests, load_reference
from dpo_dist.runtime.distributed import DistContext
from dpo_dist.runtime.roles import REFERENCE, Roles


@pytest.fixture(scope="module")
def model():
    cfg = from_dict({"reference": {"placement": "ranks"}})
    module, _ = load_reference(cfg, DistContext(), DEFAULT_CHECKPOINT)
    return module


def _request(seed: int, rows: int, length: int, fused: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : length // 3] = 0  # some padding inside the request, as TRL's collator leaves it
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if fused:
        kwargs.update(labels=ids.masked_fill(mask == 0, -100), fused_lm_head=True)
    return {"kind": "forward", "kwargs": kwargs}


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_answers_are_bitwise_the_single_request_forward(model, batch, fused):
    cfg = from_dict({"reference": {"placement": "ranks", "batch_requests": batch}})
    roles = Roles(REFERENCE, 3, 4, 3, 1, None, timedelta(seconds=10))
    server = Server(cfg, DistContext(), roles, model, model)
    requests = [_request(1, 4, 48, fused), _request(2, 4, 48, fused), _request(3, 2, 30, fused)]
    answers = server.run_round(requests)
    key = "log_probs" if fused else "logits"
    with torch.no_grad():
        for req, ans in zip(requests, answers, strict=True):
            alone = getattr(model(**req["kwargs"]), key)
            assert ans[key].shape == alone.shape and torch.equal(ans[key], alone)
    assert server.total("forwards") == (2 if batch else 3)  # the two 48-token requests shared a forward


def test_groups_only_equal_lengths_and_keep_each_requests_rows():
    reqs = [_request(1, 2, 10, True), _request(2, 3, 12, True), _request(3, 1, 10, True)]
    groups = group_requests(reqs)
    assert [g[0]["input_ids"].shape for g in groups] == [(3, 10), (3, 12)]
    assert groups[0][1] == [(0, 0, 2), (2, 2, 3)] and groups[1][1] == [(1, 0, 3)]
    assert torch.equal(groups[0][0]["input_ids"][2:], reqs[2]["kwargs"]["input_ids"])
    assert groups[0][0]["fused_lm_head"] is True
