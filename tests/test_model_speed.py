"""The sped-up network computes what the network before the speed work computed.

``benchmarks/m4fuse_before_speedup.py`` is ``m4fuse/nets/model.py`` of before that work, kept
verbatim as the reference (the benchmarks time it as "before"). Same weights, same input:
outputs and gradients must agree to 1e-5 relative, and the state-dict names must be the same.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import m4fuse_before_speedup as before
from benchmarks.profile_model import build_blocks, run_chain
from m4fuse.nets import model as m4
from m4fuse.nets.model import M4Fuse, M4FuseConfig

TINY = (8, 16, 24, 32, 48, 64)


def _pair(num_experts: int = 2, output: str = "regions", dropout: float = 0.2
          ) -> tuple[M4Fuse, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = dict(widths=TINY, num_experts=num_experts, output=output,
               out_channels=3 if output == "regions" else 4, dropout=dropout)
    new = M4Fuse(M4FuseConfig(**cfg))
    ref = before.M4Fuse(before.M4FuseConfig(**cfg))
    ref.load_state_dict(new.state_dict())  # strict: same names and shapes
    return new, ref


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:g} > {rel:g} * max |ref| {scale:g}"


def test_state_dict_names_unchanged() -> None:
    new, ref = _pair()
    assert list(new.state_dict()) == list(ref.state_dict())
    assert [p.shape for p in new.state_dict().values()] == [
        p.shape for p in ref.state_dict().values()]


@pytest.mark.parametrize("expert", [None, [1], [0, 1], [1, 1]])
@pytest.mark.parametrize("size", [(16, 16, 24), (11, 14, 17)])
def test_output_equals_the_network_before_the_speedup(expert: list[int] | None,
                                      size: tuple[int, int, int]) -> None:
    new, ref = _pair()
    new.eval(), ref.eval()
    batch = 1 if expert is None else len(expert)
    x = torch.randn(batch, 4, *size, generator=torch.Generator().manual_seed(1))
    e = None if expert is None else torch.tensor(expert)
    with torch.no_grad():
        _close(new(x, e), ref(x, e))


def test_gradients_equal_the_network_before_the_speedup() -> None:
    new, ref = _pair(output="labels", dropout=0.0)  # no dropout: train mode is deterministic
    new.train(), ref.train()
    x = torch.randn(2, 4, 16, 20, 24, generator=torch.Generator().manual_seed(2))
    e = torch.tensor([0, 1])
    out_new, out_ref = new(x, e), ref(x, e)
    _close(out_new, out_ref)
    weight = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(3))
    (out_new * weight).sum().backward()
    (out_ref * weight).sum().backward()
    ref_params = dict(ref.named_parameters())
    names = [name for name, _ in new.named_parameters()]
    new_params = dict(new.named_parameters())
    # All gradients as one vector to 1e-5 of its largest entry; each tensor to 1e-3 of its
    # own (a tensor with a tiny gradient, e.g. a mixer's skip scale, sums many float32 terms
    # that cancel, so its own scale is not a fair yardstick at 1e-5).
    _close(torch.cat([new_params[n].grad.flatten() for n in names]),
           torch.cat([ref_params[n].grad.flatten() for n in names]))
    for name in names:
        _close(new_params[name].grad, ref_params[name].grad, rel=1e-3)


def test_channels_last_switch_gives_same_output(monkeypatch: pytest.MonkeyPatch) -> None:
    new, _ = _pair()
    new.eval()
    x = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        monkeypatch.setattr(m4, "CHANNELS_LAST", True)
        fast = new(x, torch.tensor([0]))
        monkeypatch.setattr(m4, "CHANNELS_LAST", False)
        plain = new(x, torch.tensor([0]))
    _close(fast, plain)
    assert fast.is_contiguous()


def test_profile_chain_reproduces_the_model() -> None:
    new, _ = _pair()
    new.eval()
    x = torch.randn(1, 4, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    values = run_chain(build_blocks(new, 1), {"x": x})
    with torch.no_grad():
        _close(values["logits"], new(x, torch.tensor([1])))
