"""Pooled vs local vs federated strategies over several seeds, per case, with paired tests.

``python -m simulations.compare --seeds 0,1,2 --modes pooled,local,fedavg,personal
[hydra overrides...]`` runs every mode on every seed with the same composed config (only
``seed``, ``fl.strategy`` and ``run_name`` differ; each seed has its own synthetic set and
split), then scores every run's final per-site models on their site's test cases, case by
case, and writes into ``<root>/runs/<name>/`` (``name``: ``run_name`` or ``compare``):

* ``comparison.json``: ``{"rows": [...], "summary": {...}}``, one row per mode, seed, site
  and test case (``mode, seed, site, case, dice_wt, dice_tc, dice_et, hd95_wt, hd95_tc,
  hd95_et``, then the lesion-wise ``lesion_dice_wt`` .. ``lesion_hd95_et`` and the counts
  ``lesion_found_wt`` .. ``lesion_fp_et``; Dice in [0, 1], HD95 in mm, null where not
  finite); the summary holds mean +- sd over seeds per mode and site (voxel-wise
  ``by_site``, lesion-wise ``by_site_lesion``), the Wilcoxon tests, the goals, wall times, the check against
  each run's own table, the cross-site matrices and the new-site results;
* ``comparison.md`` (the report, headed by the command, date and code version that made it:
  the summary's ``provenance``), ``comparison.png`` (mean +- sd per site and mode),
  ``crosssite.png`` (every site's model on every site's test cases).

``python -m simulations.compare --report runs/X/comparison.json`` prints that report again
from the JSON alone (the pages under ``docs/results/`` are made this way).

Modes: ``pooled`` and ``local`` (the baselines, :mod:`m4fuse.training.baselines`), any
``fl.strategy`` of :data:`m4fuse.run.settings.STRATEGIES` (run as a Flower simulation), and
``<strategy>-dp`` (that strategy with ``privacy=dp``). The *default strategy* is
``fl.strategy`` of the composed config.

Per-case rows: the federated ServerApp only receives each site's mean scores (the sites send
nothing more), so the comparison rebuilds each site's final model from the run's
``model.ckpt`` (the server's final weights plus the site's personal weights, fine-tuned
where the site kept its fine-tuning, put together after the run by
:func:`m4fuse.io.assembly.assemble_run`) and scores
it itself with :func:`m4fuse.training.site_steps.score_site_tests`; baselines are rebuilt from
their ``model.ckpt`` / ``models/<site>.ckpt``. The per-site means are checked against the
run's own ``sites.csv``; a difference is reported, never hidden.

The package, one module per job: :mod:`~simulations.compare.cli` (the command line),
:mod:`~simulations.compare.modes` (the modes and their overrides),
:mod:`~simulations.compare.run` (running and scoring), :mod:`~simulations.compare.summary`
(tables, paired tests), :mod:`~simulations.compare.goals` (the goals of equal sites and the
criteria files, ``criteria/default.yaml``, ``--criteria FILE``),
:mod:`~simulations.compare.skewed` (size groups and the goals of a skewed federation,
``criteria/skewed.yaml``, ``--goals FILE``), :mod:`~simulations.compare.report` (Markdown,
PNG, ``--report``), :mod:`~simulations.compare.merge` (``--merge``) and
:mod:`~simulations.compare.provenance` (command, date, code version). What other code calls is
re-exported here (not the functions ``goals.goals`` and ``provenance.provenance``, whose names
are their modules').
"""

from simulations.compare import skewed
from simulations.compare.cli import build_parser, main, parse_args
from simulations.compare.goals import DEFAULT_CRITERIA, load_criteria
from simulations.compare.merge import merge_comparisons, merge_new_site
from simulations.compare.modes import (
    BASELINES,
    DP_SUFFIX,
    check_modes,
    known_modes,
    mode_overrides,
    mode_specs,
    parse_mode,
)
from simulations.compare.provenance import (
    PROJECT_DIR,
    code_version,
    invoking_command,
    provenance_line,
)
from simulations.compare.report import (
    CHECK_TOLERANCE,
    ROW_KEYS,
    fmt,
    lesion_report_lines,
    plot,
    read_comparison,
    report_lines,
    report_text,
    write_report,
)
from simulations.compare.run import check_against_run, run_compare, run_mode, site_models
from simulations.compare.summary import (
    convergence_lines,
    lesion_tables,
    paired_tests,
    pool_new_site,
    site_table,
    summarise,
)

__all__ = [
    "BASELINES", "CHECK_TOLERANCE", "DEFAULT_CRITERIA", "DP_SUFFIX", "PROJECT_DIR", "ROW_KEYS",
    "build_parser", "check_against_run", "check_modes", "code_version", "convergence_lines",
    "fmt", "invoking_command", "known_modes", "lesion_report_lines", "lesion_tables",
    "load_criteria", "main", "merge_comparisons", "merge_new_site", "mode_overrides",
    "mode_specs", "paired_tests", "parse_args", "parse_mode", "plot", "pool_new_site",
    "provenance_line", "read_comparison", "report_lines", "report_text",
    "run_compare", "run_mode", "site_models", "site_table", "skewed", "summarise",
    "write_report",
]
