"""benchmarks/gpu_check.py on a CPU machine: it refuses cleanly without CUDA, and the parts
that do not need a GPU (the AMP training step in bfloat16/float16, the scan comparison
without mamba_ssm) run and check what they claim."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check
from m4fuse.nets.model import M4Fuse, M4FuseConfig


def test_refuses_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device available" in err and torch.__version__ in err


def test_bad_skip_names_the_part(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(gpu_check, "no_cuda_message", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    assert gpu_check.main(["--skip", "amp,warp"]) == 1
    assert "warp" in capsys.readouterr().err


@pytest.mark.parametrize("amp_dtype", ["bfloat16", "float16"])
def test_amp_step_runs_in_low_precision_with_float32_grads(amp_dtype: str) -> None:
    torch.manual_seed(0)
    model = M4Fuse(M4FuseConfig(widths=(4, 8, 8, 8, 8, 8), num_experts=2))
    x = torch.randn(1, 4, 16, 16, 16)
    target = (torch.rand(1, 3, 16, 16, 16) > 0.7).float()
    seen = []
    hook = model.decoder.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss, finite = gpu_check.make_amp_step(model, True, x, target, amp_dtype)()
    hook.remove()
    assert seen == [getattr(torch, amp_dtype)]  # the head really ran in the AMP dtype
    assert torch.isfinite(torch.tensor(loss))
    # Every parameter but expert 1's (the batch is routed to expert 0) has a float32 grad.
    grads = [p.grad for n, p in model.named_parameters() if "site_experts.1." not in n]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # The step's finiteness flag is what the GPU check reports: it must match the gradients,
    # and on the CPU they are finite (the bridge's bfloat16 conv on scales below its kernel
    # once gave NaN; see test_model.py::test_bridge_bfloat16_gradient_repeats_bit_for_bit).
    assert finite == all(bool(torch.isfinite(g).all()) for g in grads)
    assert finite


def test_scan_part_without_fused_kernel(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from m4fuse.nets import scan

    monkeypatch.setattr(scan, "_fused_selective_scan", lambda: None)
    assert gpu_check.scan_part(torch.device("cpu"), [64], repeats=1)
    out = capsys.readouterr().out
    assert "NOT installed" in out and "| 64 |" in out


def test_scan_part_compares_against_a_fused_kernel(monkeypatch: pytest.MonkeyPatch,
                                                   capsys) -> None:
    """With a 'fused' kernel that is the sequential reference the check passes; with one
    that is wrong it fails."""
    from m4fuse.nets import scan

    monkeypatch.setattr(scan, "_fused_selective_scan", lambda: scan.selective_scan_ref)
    assert gpu_check.scan_part(torch.device("cpu"), [32], repeats=1)

    def wrong(*args, **kwargs):
        return scan.selective_scan_ref(*args, **kwargs) * 1.01

    monkeypatch.setattr(scan, "_fused_selective_scan", lambda: wrong)
    assert not gpu_check.scan_part(torch.device("cpu"), [32], repeats=1)


def test_the_simulation_driver_gives_each_site_a_gpu_share_on_a_gpu_host(monkeypatch):
    """simulations.federated.simulate asks Ray for a GPU share per site where CUDA devices are
    visible (Ray hides the GPUs from a site that asks for none: it would train on CPU), none
    without, and $M4FUSE_GPUS_PER_SITE overrides it; a bad value names the variable."""
    import pytest

    from simulations.federated import GPUS_ENV, gpu_share

    monkeypatch.delenv(GPUS_ENV, raising=False)
    assert gpu_share(4, cuda_devices=0) == 0.0
    assert gpu_share(4, cuda_devices=1) == 0.25
    assert gpu_share(2, cuda_devices=8) == 1.0
    monkeypatch.setenv(GPUS_ENV, "0.5")
    assert gpu_share(4, cuda_devices=0) == 0.5
    for bad in ("half", "2"):
        monkeypatch.setenv(GPUS_ENV, bad)
        with pytest.raises(ValueError, match=GPUS_ENV):
            gpu_share(4, cuda_devices=1)
