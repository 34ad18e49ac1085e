"""Tests of the M4Fuse network (m4fuse/nets/model.py, config.py, summary.py) and
``m4fuse model summary``."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from m4fuse.nets.model import (
    GroupedMixer,
    M4Fuse,
    M4FuseConfig,
    Mamba,
)
from m4fuse.nets.summary import parameter_table
from m4fuse.personal.sets import expert_state

TINY = (8, 8, 8, 16, 16, 16)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**kw) -> M4FuseConfig:
    return M4FuseConfig(widths=TINY, **kw)


def build(cfg: M4FuseConfig, seed: int = 0) -> M4Fuse:
    torch.manual_seed(seed)
    return M4Fuse(cfg).eval()


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expert_size(model: M4Fuse, index: int = 0) -> int:
    return sum(v.numel() for v in expert_state(dict(model.named_parameters()), index).values())


# ---------------------------------------------------------------- parameter counts

PAPER = {("T", 1): 0.290e6, ("T", 2): 0.324e6, ("S", 1): 0.633e6, ("S", 2): 0.705e6,
         ("B", 1): 1.108e6, ("B", 2): 1.231e6, ("L", 1): 2.456e6, ("L", 2): 2.724e6}


@pytest.mark.parametrize(("preset", "experts"), sorted(PAPER))
def test_parameter_counts_match_paper(preset: str, experts: int) -> None:
    cfg = M4FuseConfig.preset(preset, output="labels", num_experts=experts)
    assert cfg.out_channels == 4
    with torch.device("meta"):
        model = M4Fuse(cfg)
    table = parameter_table(model)
    assert table["total"] == count(model)
    assert table["total"] == sum(table[k] for k in ("encoder", "experts", "bridge", "decoder"))
    assert abs(table["total"] - PAPER[preset, experts]) / PAPER[preset, experts] < 0.005


@pytest.mark.parametrize("widths", [TINY, M4FuseConfig.preset("T").widths])
def test_parameters_grow_linearly_with_experts(widths: tuple[int, ...]) -> None:
    with torch.device("meta"):
        models = {k: M4Fuse(M4FuseConfig(widths=widths, num_experts=k)) for k in (1, 2, 3, 4)}
    p_expert = expert_size(models[1])
    assert p_expert > 0
    for k, model in models.items():
        assert count(model) == count(models[1]) + (k - 1) * p_expert
        assert parameter_table(model)["experts"] == k * p_expert


# ---------------------------------------------------------------- shapes and routing


@pytest.mark.parametrize("output", ["regions", "labels"])
@pytest.mark.parametrize("size", [(16, 16, 16), (32, 32, 32), (20, 28, 36)])
def test_output_shape(size: tuple[int, int, int], output: str) -> None:
    cfg = M4FuseConfig(widths=(8, 8, 8, 8, 8, 8), output=output,
                       out_channels=3 if output == "regions" else 4, num_experts=3)
    model = build(cfg)
    x = torch.randn(3, 4, *size)
    with torch.no_grad():
        y = model(x, torch.tensor([2, 0, 2]))
    assert y.shape == (3, cfg.out_channels, *size)
    assert torch.isfinite(y).all()
    probs = model.probabilities(y)
    if output == "labels":
        torch.testing.assert_close(probs.sum(1), torch.ones(3, *size))
    else:
        assert probs.min() >= 0 and probs.max() <= 1


def test_vectorised_routing_equals_per_sample() -> None:
    model = build(tiny(num_experts=3))
    x = torch.randn(5, 4, 16, 16, 16)
    expert = torch.tensor([1, 0, 2, 1, 0])
    with torch.no_grad():
        batched = model(x, expert)
        single = torch.cat([model(x[i : i + 1], expert[i : i + 1]) for i in range(5)])
        shared = model(x, None)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched, shared)  # the experts do contribute
    # one expert for the whole batch takes the no-gather path; same numbers
    with torch.no_grad():
        same = model(x, torch.ones(5, dtype=torch.long))
        per = torch.cat([model(x[i : i + 1], torch.tensor([1])) for i in range(5)])
    torch.testing.assert_close(same, per, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = M4Fuse(tiny(num_experts=3, dropout=0.0)).train()
    x = torch.randn(3, 4, 32, 16, 16)  # >= 2 tokens at 1/16, else A cannot matter
    y = model(x, torch.tensor([0, 1, 2]))
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []


def test_bridge_bfloat16_gradient_repeats_bit_for_bit() -> None:
    # Scales of 4^3 and 2^3 are smaller than the bridge's 7^3 kernel: there oneDNN's bfloat16
    # channels-last weight gradient read unwritten memory (another gradient in 14 of 15 runs
    # at 4^3, sometimes NaN); the bridge runs those scales contiguous.
    from m4fuse.nets.model import Bridge

    torch.manual_seed(0)
    bridge = Bridge(tiny())
    skips = [torch.randn(2, w, s, s, s) for w, s in zip(TINY[:5], (16, 8, 4, 2, 1))]
    weights = torch.randn(2, sum(TINY[:5]))

    def spatial_grad() -> torch.Tensor:
        bridge.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = bridge(skips)
        pooled = torch.cat([t.float().mean(dim=(2, 3, 4)) for t in out], dim=1)
        (pooled * weights).sum().backward()
        return bridge.spatial.weight.grad.clone()

    first = spatial_grad()
    for _ in range(10):
        scratch = [torch.full((1 << 18,), v) for v in (float("nan"), 1e30, -3.0)]
        del scratch  # freed memory full of garbage, as other work in the process leaves it
        again = spatial_grad()
        assert torch.isfinite(again).all() and torch.equal(again, first)


def test_same_seed_same_output() -> None:
    x = torch.randn(2, 4, 16, 16, 16)
    a, b, c = build(tiny(), 7), build(tiny(), 7), build(tiny(), 8)
    e = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(a(x, e), b(x, e))
        assert not torch.allclose(a(x, e), c(x, e))


def test_grouped_mixer_equals_loop_over_groups() -> None:
    """Folding the channel groups into the batch gives the paper's per-group loop."""
    torch.manual_seed(0)
    cfg = tiny()
    mixer = GroupedMixer(16, 8, cfg).eval()
    x = torch.randn(2, 16, 3, 4, 5)
    with torch.no_grad():
        tokens = mixer.norm(x.flatten(2).transpose(1, 2))  # (B, N, C)
        parts = [
            mixer.mamba(g.transpose(1, 2)).transpose(1, 2) + mixer.skip.scale * g
            for g in tokens.chunk(cfg.mixer_groups, dim=2)
        ]
        ref = mixer.proj(mixer.norm(torch.cat(parts, dim=2))).transpose(1, 2)
        torch.testing.assert_close(mixer(x), ref.reshape(2, 8, 3, 4, 5), rtol=1e-4, atol=1e-5)


def test_mamba_matches_mambapy() -> None:
    """The hand-written Mamba equals mambapy's MambaBlock with the same weights."""
    from mambapy.mamba import MambaBlock, MambaConfig

    torch.manual_seed(0)
    d_model, length = 12, 33
    ours = Mamba(d_model, tiny()).eval()
    ref = MambaBlock(MambaConfig(d_model=d_model, n_layers=1, pscan=False)).eval()
    assert ours.dt_rank == ref.config.dt_rank == math.ceil(d_model / 16)
    with torch.no_grad():
        for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            getattr(ref, name).weight.copy_(getattr(ours, f"{name}_weight"))
        ref.dt_proj.bias.copy_(ours.dt_proj_bias)
        ref.conv1d.weight.copy_(ours.conv1d_weight)
        ref.conv1d.bias.copy_(ours.conv1d_bias)
        ref.A_log.copy_(ours.A_log)
        ref.D.copy_(ours.D)
        u = torch.randn(2, length, d_model)
        expected = ref(u)
        got = ours(u.transpose(1, 2).contiguous()).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # channel blocks of width d_model are independent sequences through the same weights
    with torch.no_grad():
        two = ours(torch.cat([u, 2 * u], dim=2).transpose(1, 2))
        torch.testing.assert_close(two[:, :d_model], got.transpose(1, 2), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(two[:, d_model:], ours(2 * u.transpose(1, 2)))
    with pytest.raises(ValueError, match="13"):
        ours(torch.randn(1, 13, 4))
    # standard inits: S4D-real A, dt = softplus(bias) within [1e-3, 0.1]
    torch.testing.assert_close(torch.exp(ours.A_log.detach()),
                               torch.arange(1.0, 17.0).expand(2 * d_model, 16))
    dt = torch.nn.functional.softplus(ours.dt_proj_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


# ---------------------------------------------------------------- new expert


def test_add_expert_starts_at_shared_model() -> None:
    model = build(tiny(num_experts=2))
    x = torch.randn(3, 4, 16, 16, 16)
    with torch.no_grad():
        before = model(x, torch.tensor([0, 1, 0]))
    p_before = count(model)
    assert model.add_expert() == 2
    assert model.config.num_experts == 2 + 1
    assert count(model) - p_before == expert_size(model, 2) == expert_size(model, 0)
    with torch.no_grad():
        new = model(x, torch.full((3,), 2))
        shared = model(x, None)
        mixed = model(x, torch.tensor([2, 1, 0]))
        after = model(x, torch.tensor([0, 1, 0]))
    assert torch.equal(new, shared)
    assert torch.equal(after, before)  # the old experts are untouched
    torch.testing.assert_close(mixed[0], shared[0])
    torch.testing.assert_close(mixed[1:], before[1:])
    # the new expert is not dead: one step on its samples moves its output
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    out = model(x, torch.full((3,), 2))
    (out * torch.randn_like(out)).sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.full((3,), 2)), model(x, None))


# ---------------------------------------------------------------- config and errors


def test_presets_and_round_trip() -> None:
    assert M4FuseConfig.preset("B").widths == (32, 64, 96, 128, 192, 256)
    assert M4FuseConfig.preset("T").widths == (16, 32, 48, 64, 96, 128)
    assert M4FuseConfig.preset("S").widths == (24, 48, 72, 96, 144, 192)
    assert M4FuseConfig.preset("L").widths == (48, 96, 144, 192, 288, 384)
    cfg = M4FuseConfig.preset("s", output="labels", num_experts=3, dropout=0.1)
    assert cfg.out_channels == 4
    back = M4FuseConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.widths, tuple)
    assert M4FuseConfig.from_dict({"widths": list(TINY)}) == tiny()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"widths": (8, 8, 8, 8, 8)}, r"\[8, 8, 8, 8, 8\]"),
        ({"widths": (8, 8, 8, 8, 8, 10)}, r"\[10\]"),
        ({"widths": TINY, "mixer_groups": 3}, "mixer_groups=3"),
        ({"widths": TINY, "output": "logits"}, "'logits'"),
        ({"widths": TINY, "output": "labels"}, "out_channels=3"),
        ({"widths": TINY, "out_channels": 4}, "out_channels=4"),
        ({"widths": TINY, "num_experts": 0}, "num_experts .* 0"),
        ({"widths": TINY, "dropout": 1.5}, "1.5"),
        ({"widths": TINY, "d_state": True}, "d_state .* True"),
    ],
)
def test_bad_config_names_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        M4FuseConfig(**kwargs)


def test_bad_preset_and_fields() -> None:
    with pytest.raises(ValueError, match="'X'"):
        M4FuseConfig.preset("X")
    with pytest.raises(ValueError, match="experts"):
        M4FuseConfig.preset("B", experts=2)
    with pytest.raises(ValueError, match="depth"):
        M4FuseConfig.from_dict({"depth": 3})


def test_bad_expert_index_names_the_value() -> None:
    model = build(tiny(num_experts=2))
    x = torch.randn(2, 4, 16, 16, 16)
    with pytest.raises(ValueError, match=r"\[-1, 5\]"):
        model(x, torch.tensor([5, -1]))
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        model(x, torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match="float32"):
        model(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16, 16\)"):
        model(x[:, :3], None)


# ---------------------------------------------------------------- CLI


def test_cli_model_summary_json() -> None:
    from m4fuse.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["model", "summary", "--preset", "B", "--experts", "2", "--classes", "4",
                   "--json"])
    assert rc == 0
    result = json.loads(out.getvalue())
    assert isinstance(result["total"], int)
    assert abs(result["total"] - 1.231e6) / 1.231e6 < 0.005
    assert result["experts"] == 2 * result["per_expert"]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["model", "summary", "--preset", "T"]) == 0
    assert "total" in out.getvalue() and "encoder" in out.getvalue()


# ---------------------------------------------------------------- per-sample gradients


def test_opacus_per_sample_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opacus sees the true batch everywhere (groups are folded inside the leaf Mamba), so
    its per-sample gradients equal each sample's own gradient. Uses the sequential
    reference scan: Opacus' functorch path needs a scan that functorch can transform."""
    import warnings

    from opacus import GradSampleModule

    import m4fuse.nets.model as model_module
    from m4fuse.nets.scan import selective_scan_ref

    monkeypatch.setattr(model_module, "selective_scan", selective_scan_ref)
    torch.manual_seed(0)
    model = M4Fuse(tiny(dropout=0.0))
    x, expert = torch.randn(3, 4, 16, 16, 16), torch.zeros(3, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "full backward hook ... no inputs"
        wrapped = GradSampleModule(model, loss_reduction="sum")
        wrapped(x, expert).square().sum().backward()
        per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
        wrapped.disable_hooks()
        for i in range(3):
            model.zero_grad(set_to_none=True)
            model(x[i : i + 1], expert[:1]).square().sum().backward()
            for name, p in model.named_parameters():
                assert per_sample[name].shape[0] == 3, name
                # float32 sums over thousands of voxels in another order: compare
                # against the gradient's scale
                err = (per_sample[name][i] - p.grad).abs().max()
                assert err <= 1e-3 * p.grad.abs().max() + 1e-8, (name, i, float(err))
