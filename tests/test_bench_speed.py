"""benchmarks/bench_speed.py at a tiny size: the ``bf16`` peer's rows run their forward in
bfloat16 on the same weights, and a bf16 row's "/ SegResNet (same dtype)" ratios divide by
the bf16 SegResNet row (timings replaced by fixed numbers, so the ratios are known)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SegResNet
from torch import nn

from benchmarks import bench_speed
from m4fuse.nets.model import M4Fuse, M4FuseConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SECONDS = {"M4Fuse-B now": 4.0, "M4Fuse-B now, bf16 autocast": 2.0, "SegResNet-32": 8.0,
           "SegResNet-32, bf16 autocast": 4.0}


def _tiny_models() -> list[tuple[str, nn.Module, bool]]:
    torch.manual_seed(0)
    now = M4Fuse(M4FuseConfig(widths=(8, 8, 8, 8, 8, 8), num_experts=2, d_state=2))
    seg = SegResNet(spatial_dims=3, init_filters=8, in_channels=4, out_channels=3,
                    blocks_down=(1, 1), blocks_up=(1,))
    return [("M4Fuse-B now", now, True),
            ("M4Fuse-B now, bf16 autocast", bench_speed._Bf16Autocast(now), True),
            ("SegResNet-32", seg, False),
            ("SegResNet-32, bf16 autocast", bench_speed._Bf16Autocast(seg), False)]


@pytest.fixture
def fixed_times(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[torch.dtype]]:
    """Each step runs once (recording its convolutions' output dtypes); the times are SECONDS."""
    seen: dict[str, set[torch.dtype]] = {}

    def interleaved(steps, device, repeats, warmup):
        for name, step in steps.items():
            dtypes = seen.setdefault(name, set())
            hook = nn.modules.module.register_module_forward_hook(
                lambda m, i, o, dtypes=dtypes: (
                    dtypes.add(o.dtype) if isinstance(m, nn.Conv3d) else None))
            try:
                step()
            finally:
                hook.remove()
        return {name: SECONDS[name] for name in steps}

    monkeypatch.setattr(bench_speed, "_interleaved", interleaved)
    return seen


def _ratios(table: str, column: int) -> dict[str, str]:
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    return {row[0]: row[column] for row in rows[2:]}  # after the header and the rule


def test_bf16_rows_train_in_bfloat16_against_the_bf16_segresnet(fixed_times) -> None:
    table = bench_speed.train_table(_tiny_models(), (16, 16, 16), torch.device("cpu"), 1, 0)
    assert "time / SegResNet (same dtype)" in table and "mem / SegResNet (same dtype)" in table
    assert fixed_times == {"M4Fuse-B now": {torch.float32},
                           "M4Fuse-B now, bf16 autocast": {torch.bfloat16},
                           "SegResNet-32": {torch.float32},
                           "SegResNet-32, bf16 autocast": {torch.bfloat16}}
    assert _ratios(table, 3) == {"M4Fuse-B now": "0.50", "M4Fuse-B now, bf16 autocast": "0.50",
                                 "SegResNet-32": "1.00", "SegResNet-32, bf16 autocast": "1.00"}
    assert _ratios(table, 4)["SegResNet-32, bf16 autocast"] == "1.00"


def test_bf16_rows_in_sliding_window_inference(fixed_times) -> None:
    table = bench_speed.infer_table(_tiny_models(), (20, 20, 20), (16, 16, 16), 0.25,
                                    torch.device("cpu"), 1)
    assert fixed_times["M4Fuse-B now, bf16 autocast"] == {torch.bfloat16}
    assert fixed_times["SegResNet-32"] == {torch.float32}
    assert _ratios(table, 2) == {"M4Fuse-B now": "0.50", "M4Fuse-B now, bf16 autocast": "0.50",
                                 "SegResNet-32": "1.00", "SegResNet-32, bf16 autocast": "1.00"}


def test_the_bf16_peer_wraps_the_same_models() -> None:
    alone = bench_speed._models(["bf16"])
    assert [name for name, _, _ in alone] == ["M4Fuse-B now", "M4Fuse-B now, bf16 autocast"]
    assert alone[1][1].model is alone[0][1]  # the same weights
    both = {name: model for name, model, _ in bench_speed._models(["bf16", "segresnet"])}
    assert both["SegResNet-32, bf16 autocast"].model is both["SegResNet-32"]
    with pytest.raises(SystemExit, match="unknown peer"):
        bench_speed.main(["--peers", "bf32", "--parts", "sizes"])
