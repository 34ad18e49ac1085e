"""The comparison report's convergence lines (simulations.compare.convergence_lines)."""

from __future__ import annotations

from simulations.compare import convergence_lines


def test_convergence_lines_show_the_last_rounds_and_the_last_change():
    history = [{"round": r, "val": {"dice_mean": d}}
               for r, d in ((1, 0.2), (2, 0.5), (3, 0.6), (4, 0.65), (5, 0.7))]
    results = {"fedavg": {"history": history}, "empty": {"history": []},
               "pooled": {"history": history[:2]}}
    lines = convergence_lines(results, last=3)
    assert lines == ["- fedavg: r3 0.600, r4 0.650, r5 0.700 (last-round change +0.050)",
                     "- pooled: r1 0.200, r2 0.500 (last-round change +0.300)"]
