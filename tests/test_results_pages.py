"""The result pages under ``docs/results/`` are what ``python -m simulations.compare --report``
prints from the ``comparison.json`` committed beside them, and a comparison records where it
comes from (command, date, code version).

Every page ``docs/results/<name>.md`` (but ``README.md``) is generated from
``docs/results/<name>/comparison.json`` (or, for a curve, ``privacy_curve.json`` by
``python -m simulations.privacy_curve --report`` and ``learning_curve.json`` by
``python -m simulations.learning_curve --report``); a page without its JSON, or one that
differs from what the command prints, fails here. ``docs/results/example`` is a small hand-made fixture in
the comparison's real format, written by this file run as a program::

    python -m tests.test_results_pages          # writes docs/results/example/comparison.json
    python -m simulations.compare --report docs/results/example/comparison.json \\
        > docs/results/example.md
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simulations import compare

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
PAGES = sorted(p for p in RESULTS.glob("*.md") if p.name != "README.md")


#: the JSON a curve page is generated from, and the module whose ``--report`` prints it
CURVES = {"privacy_curve.json": "simulations.privacy_curve",
          "learning_curve.json": "simulations.learning_curve"}


def source_of(page: Path) -> Path:
    """The JSON a results page is generated from: ``<name>/comparison.json`` beside it, its
    gzip-compressed copy ``<name>/comparison.json.gz``, or a curve's JSON (:data:`CURVES`)."""
    folder = page.with_suffix("")
    for name in ("comparison.json.gz", *CURVES):
        if (folder / name).is_file():
            return folder / name
    return folder / "comparison.json"


def test_there_is_a_page_to_check() -> None:
    assert PAGES, f"no results page under {RESULTS}"


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_each_page_is_what_the_command_prints_from_its_json(page: Path, capsys,
                                                          tmp_path: Path) -> None:
    source = source_of(page)
    assert source.is_file(), f"{page} has no source {source}: generate it from its JSON"
    if source.name in CURVES:
        module = importlib.import_module(CURVES[source.name])
        assert module.main(["--report", str(source), "--png", str(tmp_path / "curve.png")]) == 0
        command = f"python -m {CURVES[source.name]} --report {source}"
    else:
        assert compare.main(["--report", str(source)]) == 0
        command = f"python -m simulations.compare --report {source}"
    printed = capsys.readouterr().out
    assert printed == page.read_text(), f"{page} differs from `{command}`: regenerate it"


def test_the_page_carries_its_provenance_and_numbers_from_the_rows() -> None:
    """The example page: the provenance line, and one table cell worked out from the per-case
    rows by hand (numpy here, not the comparison's own helpers)."""
    page = RESULTS / "example.md"
    payload = json.loads(source_of(page).read_text())
    made = payload["summary"]["provenance"]
    text = page.read_text()
    assert (f"Made by `{made['command']}` on {made['date']}; code version "
            f"{made['code_version']}.") in text
    # local, site1: per seed the mean over its cases of mean(Dice WT, TC, ET); then mean ± sd
    per_seed = []
    for seed in (0, 1):
        rows = [r for r in payload["rows"]
                if r["mode"] == "local" and r["site"] == "site1" and r["seed"] == seed]
        per_seed.append(np.mean([np.mean([r["dice_wt"], r["dice_tc"], r["dice_et"]])
                                 for r in rows]))
    cell = f"{np.mean(per_seed):.3f} ± {np.std(per_seed, ddof=1):.3f}"
    local_line = next(line for line in text.splitlines() if line.startswith("| local |"))
    assert local_line.split(" | ")[2] == cell


def test_a_gzipped_source_gives_the_same_page(tmp_path, capsys) -> None:
    import gzip

    source = source_of(RESULTS / "example.md")
    packed = tmp_path / "comparison.json.gz"
    packed.write_bytes(gzip.compress(source.read_bytes()))
    assert compare.main(["--report", str(packed)]) == 0
    assert capsys.readouterr().out == (RESULTS / "example.md").read_text()


def test_a_comparison_without_provenance_reads_unknown(tmp_path, capsys) -> None:
    payload = json.loads(source_of(RESULTS / "example.md").read_text())
    del payload["summary"]["provenance"]
    old = tmp_path / "comparison.json"
    old.write_text(json.dumps(payload))
    compare.main(["--report", str(old)])
    assert "Made by `unknown` on unknown; code version unknown." in capsys.readouterr().out


def test_a_file_that_is_no_comparison_is_refused_in_one_line(tmp_path) -> None:
    bad = tmp_path / "comparison.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(SystemExit) as err:
        compare.main(["--report", str(bad)])
    message = str(err.value)
    assert str(bad) in message and "\n" not in message
    with pytest.raises(SystemExit, match="missing.json"):
        compare.main(["--report", str(tmp_path / "missing.json")])


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_code_version_is_the_commit_and_says_dirty(tmp_path) -> None:
    """Against a repository made here: its commit, ``+dirty`` once a tracked file changes,
    ``unknown`` outside any repository."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n")
    _git(repo, "add", "a.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    commit = _git(repo, "rev-parse", "HEAD")
    assert compare.code_version(repo) == commit
    (repo / "a.txt").write_text("two\n")
    assert compare.code_version(repo) == commit + "+dirty"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert compare.code_version(plain) == "unknown"


def test_the_command_is_named_as_a_user_types_it() -> None:
    """``python -m simulations.compare`` runs the package's ``__main__.py``; a plain module
    (``python -m simulations.finetune_runs``) is its file."""
    program = str(REPO / "simulations" / "compare" / "__main__.py")
    assert compare.invoking_command([program, "--seeds", "0,1", "run_name=a b"]) == \
        "python -m simulations.compare --seeds 0,1 'run_name=a b'"
    module = str(REPO / "simulations" / "finetune_runs.py")
    assert compare.invoking_command([module, "--mode", "fedavg"]) == \
        "python -m simulations.finetune_runs --mode fedavg"


def test_a_written_comparison_records_its_provenance(tmp_path) -> None:
    """``write_report`` (through ``summarise``) stores the provenance in comparison.json and
    heads comparison.md with it; ``--report`` prints the same page again."""
    path = write_example(tmp_path / "ex")
    summary = json.loads(path.read_text())["summary"]
    assert set(summary["provenance"]) == {"command", "date", "code_version", "platform"}
    assert summary["provenance"]["date"].endswith("UTC")
    found = summary["provenance"]["platform"]
    assert found["torch"] == torch.__version__ and found["numpy"] == np.__version__
    assert found["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    md = (tmp_path / "ex" / "comparison.md").read_text()
    assert md.splitlines()[2] == compare.provenance_line(summary)
    assert f"; computed on torch {torch.__version__} (CPU kernels {found['cpu_kernels']})" \
        in md.splitlines()[2]
    assert compare.report_text(path) == md


# --------------------------------------------------------------------------- the fixture

SITES = ["site0", "site1", "site2", "site3"]
#: Mode -> a base Dice per site (hand-picked to resemble a small comparison).
BASE = {"pooled": [0.90, 0.88, 0.82, 0.82], "local": [0.90, 0.88, 0.80, 0.81],
        "fedavg": [0.89, 0.87, 0.77, 0.76], "personal-norm-ft": [0.90, 0.89, 0.81, 0.80]}


def example_rows(cases: int = 3, seeds: tuple[int, ...] = (0, 1)) -> list[dict]:
    """Per-case rows of 4 modes x 2 seeds x 4 sites x 3 test cases: a base Dice per mode and
    site, a seeded jitter per case (the same jitter for every mode of a case, as the cases of
    one site are shared), HD95 in mm."""
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        jitter = rng.normal(0.0, 0.02, size=(len(SITES), cases, 3))
        for m, (mode, base) in enumerate(BASE.items()):
            noise = np.random.default_rng([seed, m]).normal(0.0, 0.005, size=jitter.shape)
            for s, site in enumerate(SITES):
                for c in range(cases):
                    wt, tc, et = np.clip(base[s] + jitter[s, c] + noise[s, c], 0, 1).round(4)
                    rows.append({"mode": mode, "seed": seed, "site": site,
                                 "case": f"{site}-case{c}", "dice_wt": float(wt),
                                 "dice_tc": float(tc), "dice_et": float(et),
                                 "hd95_wt": 2.0 + c, "hd95_tc": 2.5, "hd95_et": 3.0})
    return rows


def write_example(out: Path) -> Path:
    """The example comparison written by the comparison's own ``summarise`` and
    ``write_report`` (as a finished ``run_compare`` would); returns its ``comparison.json``."""
    rows = example_rows()
    seeds = sorted({r["seed"] for r in rows})
    modes = list(BASE)
    summary = compare.summarise(
        name="example", default="personal-norm-ft", modes=modes, seeds=seeds, sites=SITES,
        overrides=["fl.rounds=60"],
        test_cases={str(s): {site: 3 for site in SITES} for s in seeds},
        budget={"rounds": 60, "local_epochs": 1}, rows=rows, cross_rows={}, new_site=None,
        seconds={m: {str(s): {"run": 0.0, "scoring": 0.0} for s in seeds} for m in modes},
        bytes_by_mode={m: [0.0] * len(seeds) for m in modes},
        check={m: {str(s): 0.0 for s in seeds} for m in modes}, convergence=[])
    path, _ = compare.write_report(out, summary, rows, {}, summary.pop("_new_site_rows"))
    return path


if __name__ == "__main__":
    target = RESULTS / "example"
    written = write_example(target)
    for extra in ("comparison.md", "comparison.png"):  # the page is made by --report instead
        (target / extra).unlink(missing_ok=True)
    print(f"wrote {written}", file=sys.stderr)
