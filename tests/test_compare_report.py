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


def test_lesion_tables_and_report_lines_from_hand_made_rows():
    from simulations.compare import lesion_report_lines, lesion_tables

    def row(mode, seed, site, dice, hd):
        r = {"mode": mode, "seed": seed, "site": site, "case": f"c{seed}{site}"}
        for g, d, h in zip(("wt", "tc", "et"), dice, hd):
            r.update({f"lesion_dice_{g}": d, f"lesion_hd95_{g}": h, f"lesion_found_{g}": 1.0,
                      f"lesion_missed_{g}": 0.0, f"lesion_fp_{g}": 0.0})
        return r

    rows = [row("fedavg", 0, "s0", (0.9, 0.6, 0.3), (3.0, 6.0, 9.0)),  # case means 0.6, 6
            row("fedavg", 0, "s1", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),  # 1.0, 0
            row("fedavg", 1, "s0", (0.6, 0.6, 0.6), (12.0, 12.0, 12.0))]  # 0.6, 12
    tables = lesion_tables(rows, ["fedavg"], [0, 1], ["s0", "s1"])
    s0 = tables["dice"]["fedavg"]["s0"]
    assert s0["per_seed"] == {"0": 0.6, "1": 0.6} and s0["mean"] == 0.6 and s0["n_seeds"] == 2
    # all sites, seed 0: (0.6 + 1.0) / 2 = 0.8; seed 1: 0.6 -> mean 0.7
    assert tables["dice"]["fedavg"]["mean"]["mean"] == 0.7
    assert tables["hd95"]["fedavg"]["s0"]["per_seed"] == {"0": 6.0, "1": 12.0}
    text = "\n".join(lesion_report_lines(tables, ["fedavg"], ["s0", "s1"]))
    assert "| lesion-wise Dice | s0 | s1 | all sites |" in text
    assert "| lesion-wise HD95 (mm) | s0 | s1 | all sites |" in text
    # HD95 s0: seeds 6 and 12 -> 9.0 ± 4.2 (sample sd); s1: one seed, no sd; all sites:
    # seed 0 (6 + 0) / 2 = 3, seed 1 12 -> 7.5 ± 6.4
    assert "| fedavg | 9.0 ± 4.2 | 0.0 | 7.5 ± 6.4 |" in text
    # rows from before the lesion-wise scores: no table
    assert lesion_tables([{"mode": "fedavg", "seed": 0, "site": "s0", "dice_wt": 1.0}],
                         ["fedavg"], [0], ["s0"]) is None
    assert lesion_report_lines(None, ["fedavg"], ["s0"]) == []
