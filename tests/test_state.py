"""Tests of the shared/personal split (m4fuse/personal/sets.py) on real M4Fuse state dicts."""

from __future__ import annotations

import pytest
import torch

from m4fuse.nets.model import M4Fuse, M4FuseConfig
from m4fuse.personal.sets import expert_index, expert_state, is_personal, place_expert, split_state

WIDTHS = (8, 8, 8, 16, 16, 16)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(experts: int, seed: int = 0) -> M4Fuse:
    torch.manual_seed(seed)
    return M4Fuse(M4FuseConfig(widths=WIDTHS, num_experts=experts)).eval()


def test_split_is_disjoint_and_covers_the_state() -> None:
    state = build(3).state_dict()
    shared, personal = split_state(state)
    assert set(shared).isdisjoint(personal)
    assert set(shared) | set(personal) == set(state)
    assert all(shared[k] is state[k] for k in shared)
    # personal = exactly the site experts of the three expert units, nothing else
    assert set(personal) == {k for k in state if ".site_experts." in k}
    assert not any("site_experts" in k for k in shared)
    units = {k.split(".site_experts.")[0] for k in personal}
    assert units == {"encoder.unit4", "encoder.unit5", "encoder.bottleneck"}
    assert {expert_index(k) for k in personal} == {0, 1, 2}
    assert all(expert_index(k) is None and not is_personal(k) for k in shared)
    # every expert has the same keys (index aside)
    keys = [set(expert_state(state, i)) for i in range(3)]
    assert keys[0] == keys[1] == keys[2] and len(keys[0]) * 3 == len(personal)


def test_shared_keys_do_not_depend_on_the_number_of_experts() -> None:
    one, four = build(1).state_dict(), build(4).state_dict()
    assert set(split_state(one)[0]) == set(split_state(four)[0])


def test_expert_moves_between_index_k_and_0() -> None:
    """Expert 2 of a pooled model, placed at index 0 of a one-expert model with the same
    shared weights, gives the same output; and back again."""
    pooled = build(3)
    shared, _ = split_state(pooled.state_dict())
    moved = place_expert(expert_state(pooled.state_dict(), 2), 0)
    assert set(moved) == {k.replace(".site_experts.2.", ".site_experts.0.")
                          for k in pooled.state_dict() if ".site_experts.2." in k}
    site = build(1, seed=1)
    site.load_state_dict({**shared, **moved}, strict=True)
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        expected = pooled(x, torch.tensor([2, 2]))
        torch.testing.assert_close(site(x, torch.tensor([0, 0])), expected)
        assert not torch.allclose(site(x, torch.tensor([0, 0])), pooled(x, torch.tensor([0, 0])))

    back = place_expert(expert_state(site.state_dict(), 0), 1)
    other = build(3, seed=2)
    missing, unexpected = other.load_state_dict({**shared, **back}, strict=False)
    assert unexpected == [] and all(expert_index(k) in (0, 2) for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(other(x, torch.tensor([1, 1])), expected)


def test_place_expert_rejects_a_shared_key() -> None:
    with pytest.raises(KeyError, match="encoder.conv1.weight"):
        place_expert({"encoder.conv1.weight": torch.zeros(1)}, 0)
