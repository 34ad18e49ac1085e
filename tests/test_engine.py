"""The local train / evaluate loop: losses, schedule, routing, FedProx, determinism, scoring."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from engine_fixtures import TinyNet, toy_batches
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from m4fuse.data.fake import write_spaced_case
from m4fuse.evaluation.metrics import region_scores
from m4fuse.inference.predict import probs_to_regions
from m4fuse.run.runtime import resolve_device
from m4fuse.training.engine import (
    LabelDiceCELoss,
    RegionDiceBCELoss,
    TrainConfig,
    make_optimizer,
)
from m4fuse.training.scoring import evaluate, score_on_original_grid
from m4fuse.training.trainer import train_epochs


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_config_checks_values() -> None:
    assert TrainConfig().lr == 1e-3
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="local_epochs"):
        TrainConfig(local_epochs=0)
    with pytest.raises(ValueError, match="amp_dtype"):
        TrainConfig(amp_dtype="int8")
    with pytest.raises(ValueError, match="unknown TrainConfig keys.*'lrr'"):
        TrainConfig.from_dict({"lrr": 1.0})
    assert TrainConfig.from_dict({"lr": 0.5, "grad_clip": None}).grad_clip is None


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda:0"):
            resolve_device("cuda:0")


def test_region_loss_is_dice_plus_bce_not_softmax_ce() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6)
    target = (torch.rand(2, 3, 6, 6, 6) > 0.5).float()
    ours = RegionDiceBCELoss()(logits, target)
    expected = DiceLoss(sigmoid=True)(logits, target) + nn.BCEWithLogitsLoss()(logits, target)
    assert float(ours) == pytest.approx(float(expected), rel=1e-6)
    # MONAI's DiceCELoss would use a softmax CE over the 3 overlapping channels: different.
    assert float(DiceCELoss(sigmoid=True)(logits, target)) != pytest.approx(float(ours), rel=1e-3)


def test_label_loss_targets_classes_from_regions() -> None:
    regions = torch.zeros(1, 3, 4, 4, 4)
    regions[0, 0, :2] = 1  # WT
    regions[0, 1, :1] = 1  # TC inside WT
    regions[0, 2, 0, :2] = 1  # ET inside TC
    classes = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    classes[0, :2] = 2
    classes[0, :1] = 1
    classes[0, 0, :2] = 3
    perfect = 20.0 * (nn.functional.one_hot(classes, 4).permute(0, 4, 1, 2, 3).float() * 2 - 1)
    wrong = perfect.roll(1, dims=1)
    loss = LabelDiceCELoss()
    assert float(loss(perfect, regions)) < 0.01
    assert float(loss(wrong, regions)) > 1.0


def test_schedule_warmup_cosine_and_resume() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=2, min_lr=0.0)
    model = nn.Linear(2, 2)
    opt, sched = make_optimizer(model, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # cosine decays
    opt2, sched2 = make_optimizer(model, cfg, total_steps=10, start_step=6)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[6])
    with pytest.raises(ValueError, match="warmup_steps"):
        make_optimizer(model, TrainConfig(warmup_steps=10), total_steps=10)
    with pytest.raises(ValueError, match="start_step"):
        make_optimizer(model, cfg, total_steps=10, start_step=11)


def _train(seed: int, epochs: int = 1, **kw) -> tuple[nn.Module, dict]:
    torch.manual_seed(123)
    model = TinyNet()
    cfg = TrainConfig(lr=1e-2, seed=seed, local_epochs=epochs)
    batches = toy_batches(5, 2)
    opt, sched = make_optimizer(model, cfg, total_steps=len(batches) * epochs)
    out = train_epochs(model, batches, opt, sched, cfg, "cpu", **kw)
    return model, out


def test_train_reports_cases_not_batches_and_learns() -> None:
    model, out = _train(0, epochs=1)
    assert out["num-examples"] == 5  # 5 cases in 3 batches
    torch.manual_seed(123)
    model = TinyNet(dropout=0.0)
    cfg = TrainConfig(lr=2e-2, local_epochs=1)
    batches = toy_batches(4, 2)
    opt, _ = make_optimizer(model, cfg, total_steps=100)
    first = train_epochs(model, batches, opt, None, cfg, "cpu")["loss"]
    for _ in range(12):
        last = train_epochs(model, batches, opt, None, cfg, "cpu")
    assert last["loss"] < 0.7 * first
    assert last["num-examples"] == 4


def test_training_is_deterministic_for_a_seed_on_cpu() -> None:
    a, out_a = _train(seed=7)
    b, out_b = _train(seed=7)
    c, _ = _train(seed=8)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert out_a == out_b
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # dropout masks differ


def test_expert_routing_choices() -> None:
    batches = toy_batches(4, 2, sites=(1, 0))
    for expert, expected in (("site", [[1, 0], [1, 0]]), (1, [[1, 1], [1, 1]]), (None, [None, None])):
        model = TinyNet()
        cfg = TrainConfig(seed=0)
        opt, _ = make_optimizer(model, cfg, total_steps=2)
        before = _state(model)
        train_epochs(model, batches, opt, None, cfg, "cpu", expert=expert)
        assert model.seen == expected
        moved = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
        experts_moved = {k.split(".")[1] for k in moved if k.startswith("site_experts")}
        assert experts_moved == {"site": {"0", "1"}, 1: {"1"}, None: set()}[expert]
    with pytest.raises(ValueError, match="expert"):
        train_epochs(TinyNet(), batches, opt, None, cfg, "cpu", expert="hospital")


def test_fedprox_pulls_only_the_given_keys() -> None:
    model = TinyNet(dropout=0.0)
    start = _state(model)
    ref = {"body.0.weight": start["body.0.weight"] + 1.0}
    # no segmentation loss: only the proximal term has gradients
    cfg = TrainConfig(lr=1e-2, weight_decay=0.0, lambda_dice=0.0, lambda_ce=0.0, grad_clip=None)
    opt, _ = make_optimizer(model, cfg, total_steps=10)
    train_epochs(model, toy_batches(2, 1), opt, None, cfg, "cpu", prox_mu=1.0, prox_reference=ref)
    after = _state(model)
    gap_before = (start["body.0.weight"] - ref["body.0.weight"]).abs().mean()
    gap_after = (after["body.0.weight"] - ref["body.0.weight"]).abs().mean()
    assert gap_after < gap_before - 0.015  # two Adam steps of lr 1e-2 towards the reference
    for key in start:
        if key != "body.0.weight":
            assert torch.equal(start[key], after[key]), key
    # without the term nothing moves at all
    model2 = TinyNet(dropout=0.0)
    s2 = _state(model2)
    opt2, _ = make_optimizer(model2, cfg, total_steps=10)
    train_epochs(model2, toy_batches(2, 1), opt2, None, cfg, "cpu")
    assert all(torch.equal(s2[k], model2.state_dict()[k]) for k in s2)
    with pytest.raises(KeyError, match="nope"):
        train_epochs(model, toy_batches(1, 1), opt, None, cfg, "cpu", prox_mu=1.0,
                     prox_reference={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="prox_reference"):
        train_epochs(model, toy_batches(1, 1), opt, None, cfg, "cpu", prox_mu=1.0)


class _PredictionInInput(nn.Module):
    """A "network" whose region logits are +-10 where the first three input channels are 1 /
    0: the batch itself carries a hand-built prediction."""

    config = SimpleNamespace(output="regions", num_experts=2)

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # something to place on a device

    def forward(self, x: torch.Tensor, expert: torch.Tensor | None = None) -> torch.Tensor:
        return 20.0 * (x[:, :3] - 0.5) + 0.0 * self.unused


def _box(lo: tuple[int, int, int], hi: tuple[int, int, int], size: int = 12) -> torch.Tensor:
    mask = torch.zeros((size,) * 3)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1.0
    return mask


def test_evaluate_scores_a_hand_built_prediction_and_restores_mode() -> None:
    """Two cases with known overlaps, voxels of 2 x 1 x 1 mm. Case 0: WT a 4^3 box predicted
    one voxel deeper along axis 0 (overlap 48 of 64 + 64: Dice 0.75; the faces one voxel
    apart are 2 mm apart and are 16 of the 56 surface voxels, so HD95 is 2 mm); TC exact;
    ET absent in both (Dice 1, HD95 0). Case 1: WT exact; TC a 2^3 box predicted 3 x 2 x 2
    (Dice 2 * 8 / 20 = 0.8; the extra layer 2 mm away: HD95 2 mm); ET one voxel, missed
    (Dice 0, HD95 the empty-prediction value)."""
    from m4fuse.evaluation.metrics import EMPTY_HD95_MM

    empty = torch.zeros((12,) * 3)
    truth = [torch.stack([_box((2, 2, 2), (6, 6, 6)), _box((3, 3, 3), (5, 5, 5)), empty]),
             torch.stack([_box((2, 2, 2), (8, 8, 8)), _box((3, 3, 3), (5, 5, 5)),
                          _box((3, 3, 3), (4, 4, 4))])]
    predicted = [torch.stack([_box((3, 2, 2), (7, 6, 6)), _box((3, 3, 3), (5, 5, 5)), empty]),
                 torch.stack([_box((2, 2, 2), (8, 8, 8)), _box((3, 3, 3), (6, 5, 5)), empty])]
    images = torch.stack([torch.cat([p, torch.zeros(1, 12, 12, 12)]) for p in predicted])
    batch = {"image": images, "label": torch.stack(truth), "site": torch.tensor([0, 1])}
    model = _PredictionInInput()
    model.train()
    out = evaluate(model, [batch], "cpu", expert="site", spacing=(2.0, 1.0, 1.0))
    assert model.training  # mode restored
    assert out["num-examples"] == 2
    expected = {"dice_wt": (0.75 + 1.0) / 2, "dice_tc": (1.0 + 0.8) / 2, "dice_et": 0.5,
                "hd95_wt": 1.0, "hd95_tc": 1.0, "hd95_et": EMPTY_HD95_MM / 2}
    expected["dice_mean"] = (0.875 + 0.9 + 0.5) / 3
    expected["hd95_mean"] = (1.0 + 1.0 + EMPTY_HD95_MM / 2) / 3
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
    assert out["loss"] > 0


def test_evaluate_scores_each_case_at_its_own_spacing() -> None:
    """HD95 in mm: with ``{case: spacing}`` each case is measured on its own grid; the result
    equals scoring each case alone at its spacing, and an unknown case is refused."""
    from types import MappingProxyType

    from m4fuse.training.site_steps import training_grid_spacing

    torch.manual_seed(0)
    model = TinyNet()
    batches = toy_batches(2, 1)
    for i, b in enumerate(batches):
        b["case"] = [f"case{i}"]
    spacing = {"case0": (2.0, 1.0, 1.0), "case1": (1.0, 3.0, 0.5)}
    out = evaluate(model, batches, "cpu", spacing=MappingProxyType(spacing))
    alone = [evaluate(model, [b], "cpu", spacing=spacing[f"case{i}"])
             for i, b in enumerate(batches)]
    for key in ("hd95_wt", "hd95_tc", "hd95_et", "dice_wt"):
        assert out[key] == pytest.approx((alone[0][key] + alone[1][key]) / 2, abs=1e-6), key
    with pytest.raises(KeyError, match="case1"):
        evaluate(model, batches, "cpu", spacing={"case0": (1.0, 1.0, 1.0)})
    # a cached case: crop box 120 x 100 x 62 voxels of (1, 1, 2.5) mm resized to (32, 40, 48)
    record = SimpleNamespace(case_id="c", meta={
        "spacing": [1.0, 1.0, 2.5], "crop_start": [10, 20, 3], "crop_end": [130, 120, 65],
        "size": [32, 40, 48]})
    assert training_grid_spacing(record) == pytest.approx((62 * 2.5 / 32, 100 / 40, 120 / 48))


def test_labels_output_trains_and_evaluates() -> None:
    model = TinyNet(output="labels")
    cfg = TrainConfig(seed=0)
    opt, _ = make_optimizer(model, cfg, total_steps=2)
    out = train_epochs(model, toy_batches(2, 2), opt, None, cfg, "cpu")
    assert np.isfinite(out["loss"])
    scores = evaluate(model, toy_batches(2, 2), "cpu")
    assert 0.0 <= scores["dice_mean"] <= 1.0


class _PassThrough(nn.Module):
    """Logits read from the first 3 input channels (voxel-wise, so windows see the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(output="regions", num_experts=1)
        self.experts: list = []

    def forward(self, x: torch.Tensor, expert: torch.Tensor | None = None) -> torch.Tensor:
        self.experts.append(None if expert is None else expert.tolist())
        return x[:, :3] * 20 - 10


def test_score_on_original_grid_against_the_seg_file(tmp_path: Path) -> None:
    from m4fuse.data import CaseRecord, preprocess_case, preprocess_label

    spacing = (1.0, 1.5, 2.5)
    folder, labels, _ = write_spaced_case(tmp_path, spacing=spacing)
    cid = folder.name
    paths = [folder / f"{cid}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
    _, meta = preprocess_case(paths, size=(16, 16, 16))
    seg = folder / f"{cid}_seg.nii.gz"
    meta["seg_file"] = str(seg)
    regions = preprocess_label(seg, meta, 4).astype(np.float16)
    # the cached "image" carries the true regions at the training size: a perfect predictor
    np.save(tmp_path / "truth.npy", np.concatenate([regions, regions[:1] * 0]))
    np.save(tmp_path / "empty.npy", np.zeros((4, 16, 16, 16), np.float16))
    record = CaseRecord(cid, "siteA", tmp_path / "truth.npy", None, 4, meta)
    model = _PassThrough()
    (row,) = score_on_original_grid(model, [record], "cpu", expert_index={"siteA": 1})
    assert model.experts == [[1]]
    assert row["case"] == cid and row["site"] == "siteA"
    # resampling 16^3 -> original loses little only if the axes are put back in the right order
    assert row["dice_wt"] > 0.95 and row["hd95_wt"] < 2.0, row
    assert row["dice_tc"] > 0.7 and row["hd95_tc"] < 4.0, row  # small core, 2.5 mm slices
    # the scores are those of the restored prediction against the NIfTI seg at its spacing
    from m4fuse.data import restore_to_original

    restored = restore_to_original(torch.from_numpy(regions.astype(np.float32)), record, mode="linear")
    pred = probs_to_regions(torch.sigmoid(torch.from_numpy(restored) * 20 - 10), "regions")
    from m4fuse.data.regions import labels_to_regions

    expected = region_scores(pred.numpy(), labels_to_regions(labels, 4), spacing)
    assert {k: row[k] for k in ("case", "site", *expected)} == pytest.approx(
        {"case": cid, "site": "siteA", **expected})
    # beside them the lesion-wise scores (BraTS 2023+ rule) of the same masks
    from m4fuse.evaluation.metrics import LESION_KEYS

    assert set(row) == {"case", "site", *expected, *LESION_KEYS}
    # a prediction of nothing gives the one-empty convention for every region
    empty = CaseRecord(cid, "siteA", tmp_path / "empty.npy", None, 4, meta)
    (row0,) = score_on_original_grid(model, [empty], "cpu", expert_index=None)
    assert row0["dice_wt"] == 0.0 and row0["hd95_wt"] == 373.13
    # lesion-wise: the tumour is a missed lesion, nothing is a false positive -> 0 and 374
    assert (row0["lesion_found_wt"], row0["lesion_missed_wt"], row0["lesion_fp_wt"]) == (0, 1, 0)
    assert (row0["lesion_dice_wt"], row0["lesion_hd95_wt"]) == (0.0, 374.0)
    assert model.experts[-1] is None
    # the same scores through sliding windows smaller than the volume
    (row_sw,) = score_on_original_grid(model, [record], "cpu", expert_index=0, roi_size=(8, 8, 8))
    assert row_sw["dice_wt"] == pytest.approx(row["dice_wt"], abs=1e-6)
    with pytest.raises(KeyError, match="siteB"):
        score_on_original_grid(model, [record], "cpu", expert_index={"siteB": 0})


def test_real_m4fuse_one_step() -> None:
    from m4fuse.nets.model import M4Fuse, M4FuseConfig

    torch.manual_seed(0)
    model = M4Fuse(M4FuseConfig(widths=(4, 4, 4, 4, 4, 4), num_experts=2, d_state=2))
    before = copy.deepcopy(model.state_dict())
    cfg = TrainConfig(seed=0)
    opt, sched = make_optimizer(model, cfg, total_steps=1)
    out = train_epochs(model, toy_batches(2, 2, size=16), opt, sched, cfg, "cpu")
    assert out["num-examples"] == 2 and np.isfinite(out["loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- opt-in CPU bfloat16 autocast (train.amp_cpu) ---------------------------------------
# One torch thread (conftest's module fixture, so for the rest of this module): on the shared
# 2-core machine, two OpenMP threads have stalled in barriers.


def _tiny_m4fuse() -> nn.Module:
    from m4fuse.nets.model import M4Fuse, M4FuseConfig

    torch.manual_seed(0)
    return M4Fuse(M4FuseConfig(widths=(8, 8, 8, 8, 8, 8), num_experts=2, d_state=2))


def _conv_output_dtypes(model: nn.Module) -> tuple[list[torch.dtype], list]:
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in model.modules() if isinstance(m, nn.Conv3d)]
    return seen, hooks


def _recording_loss(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, bool]]:
    """Patch make_loss (of the trainer and the scoring) so that each loss call records
    (logits dtype, CPU autocast on)."""
    from m4fuse.training import engine, scoring, trainer

    calls: list[tuple[torch.dtype, bool]] = []
    real = engine.make_loss

    def make_loss(*args, **kwargs):
        fn = real(*args, **kwargs)

        def loss(logits, target):
            calls.append((logits.dtype, torch.is_autocast_enabled("cpu")))
            return fn(logits, target)

        return loss

    monkeypatch.setattr(trainer, "make_loss", make_loss)
    monkeypatch.setattr(scoring, "make_loss", make_loss)
    return calls


def test_cpu_autocast_is_opt_in_and_bfloat16_only() -> None:
    from m4fuse.inference.predict import autocast

    cpu = torch.device("cpu")
    for enabled, on_cpu in ((True, False), (False, True), (False, False)):
        with autocast(cpu, enabled, "bfloat16", cpu=on_cpu):
            assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, True, "bfloat16", cpu=True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="bfloat16 only.*train.amp_dtype='float16'"):
        autocast(cpu, True, "float16", cpu=True)
    autocast(cpu, True, "float16")  # float16 without cpu: CUDA only, a no-op here
    assert TrainConfig().amp_cpu is False
    with pytest.raises(ValueError, match="amp_cpu.*bfloat16 only.*'float16'"):
        TrainConfig(amp_cpu=True, amp_dtype="float16")
    assert TrainConfig(amp=False, amp_cpu=True, amp_dtype="float16").amp_cpu  # amp off: unused
    with pytest.raises(ValueError, match="amp_cpu must be a bool"):
        TrainConfig(amp_cpu="yes")


@pytest.mark.usefixtures("one_torch_thread")
def test_amp_cpu_trains_the_network_in_bfloat16_with_float32_weights(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_m4fuse()
    before = _state(model)
    losses = _recording_loss(monkeypatch)
    seen, hooks = _conv_output_dtypes(model)
    cfg = TrainConfig(seed=0, amp_cpu=True)
    opt, sched = make_optimizer(model, cfg, total_steps=1)
    out = train_epochs(model, toy_batches(2, 2, size=16), opt, sched, cfg, "cpu", expert=0)
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # every convolution ran in bfloat16
    assert losses == [(torch.float32, False)]  # the loss: float32 logits, outside autocast
    assert np.isfinite(out["loss"])
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    grads = [p.grad for n, p in params.items() if "site_experts.1." not in n]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    # The step changed the weights. It once did not, now and then: oneDNN's bfloat16
    # channels-last weight gradient of the bridge's 7^3 conv on scales smaller than the kernel
    # read unwritten memory; a huge value made the global norm infinite and the clipping
    # zeroed every gradient (test_model.py::test_bridge_bfloat16_gradient_repeats_bit_for_bit).
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.usefixtures("one_torch_thread")
def test_amp_cpu_off_by_default_trains_in_float32_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    losses = _recording_loss(monkeypatch)
    results = []
    for cfg in (TrainConfig(seed=0), TrainConfig(seed=0, amp_cpu=False),
                TrainConfig(seed=0, amp=False)):
        model = _tiny_m4fuse()
        seen, hooks = _conv_output_dtypes(model)
        opt, sched = make_optimizer(model, cfg, total_steps=1)
        out = train_epochs(model, toy_batches(2, 2, size=16), opt, sched, cfg, "cpu", expert=0)
        for hook in hooks:
            hook.remove()
        assert set(seen) == {torch.float32}
        results.append((out["loss"], _state(model)))
    assert losses == [(torch.float32, False)] * 3
    (loss, state), *others = results
    for other_loss, other_state in others:  # the default is the float32 path of amp=False
        assert other_loss == loss
        assert all(torch.equal(state[k], other_state[k]) for k in state)


@pytest.mark.usefixtures("one_torch_thread")
# 1e38: finite, but the global norm is inf; clip 0: no clipping, the gradients are checked
@pytest.mark.parametrize("factor, clip", [(float("nan"), 12.0), (1e38, 12.0), (float("nan"), 0.0)])
def test_amp_cpu_refuses_a_non_finite_gradient_before_the_step(factor: float, clip: float) -> None:
    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    before = _state(model)
    model.body[0].weight.register_hook(lambda g: g * factor)
    cfg = TrainConfig(seed=0, amp_cpu=True, grad_clip=clip)
    opt, _ = make_optimizer(model, cfg, total_steps=1)
    with pytest.raises(FloatingPointError, match="non-finite gradient.*amp_cpu"):
        train_epochs(model, toy_batches(2, 2), opt, None, cfg, "cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.usefixtures("one_torch_thread")
def test_amp_cpu_evaluation_and_sliding_window_run_in_bfloat16() -> None:
    from m4fuse.inference.predict import predict_probs

    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    batches = toy_batches(2, 2, size=16)
    image = batches[0]["image"][0]
    seen, hooks = _conv_output_dtypes(model)
    ref = evaluate(model, batches, "cpu", expert=0)
    ref_probs = predict_probs(model, image, "cpu", 0, roi_size=(8, 8, 8))
    assert set(seen) == {torch.float32}
    seen.clear()
    out = evaluate(model, batches, "cpu", expert=0, amp_cpu=True)
    probs = predict_probs(model, image, "cpu", 0, roi_size=(8, 8, 8), amp_cpu=True)
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert probs.dtype == torch.float32 and probs.shape == ref_probs.shape
    assert not torch.equal(probs, ref_probs)  # really another precision ...
    assert torch.allclose(probs, ref_probs, atol=0.05)  # ... of the same prediction
    assert out["loss"] == pytest.approx(ref["loss"], rel=0.05)
    assert out["dice_mean"] == pytest.approx(ref["dice_mean"], abs=0.05)
