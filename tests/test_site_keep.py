"""What a site keeps between rounds (m4fuse.personal.site_keep), without Flower."""

from __future__ import annotations

import torch

from m4fuse.personal import site_keep


def _state() -> dict[str, dict[str, torch.Tensor]]:
    return {"encoder.norm.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)},
            "encoder.conv.weight": {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}


def test_optimizer_state_round_trips_and_personal_keeps_only_the_kept_set() -> None:
    flat = site_keep.optimizer_state_to_keep(_state(), "all", "personal-norm")
    assert set(flat) == {"encoder.norm.weight|step", "encoder.norm.weight|exp_avg",
                         "encoder.conv.weight|step", "encoder.conv.weight|exp_avg"}
    back = site_keep.optimizer_state_to_start(flat, "all")
    assert set(back) == set(_state()) and torch.equal(back["encoder.norm.weight"]["exp_avg"],
                                                      torch.ones(2))
    personal = site_keep.optimizer_state_to_keep(_state(), "personal", "personal-norm")
    assert {k.split("|")[0] for k in personal} == {"encoder.norm.weight"}
    assert site_keep.optimizer_state_to_start(flat, "fresh") is None
    assert site_keep.optimizer_state_to_start(None, "personal") == {}


def test_newest_accountant_takes_the_history_with_most_steps() -> None:
    few = {"mechanism": "rdp", "noise_multiplier": [1.0], "sample_rate": [0.5], "steps": [2]}
    more = {"mechanism": "rdp", "noise_multiplier": [1.0, 1.0], "sample_rate": [0.5, 0.5],
            "steps": [2, 2]}
    assert site_keep.newest_accountant(few, more) == more
    assert site_keep.newest_accountant(few, None) == few
    assert site_keep.newest_accountant(None, None) is None
