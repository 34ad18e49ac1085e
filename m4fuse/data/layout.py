"""Finding BraTS cases on disk (2019/2020, 2021 and 2023+ layouts) and the errors bad input gets.

Layouts recognised (any depth below the root, ``.nii`` or ``.nii.gz``):

* 2019/2020: ``HGG/BraTS19_CBICA_AAB_1/BraTS19_CBICA_AAB_1_{t1,t1ce,t2,flair,seg}.nii.gz``
  (also ``LGG/``, and 2020's flat ``BraTS20_Training_001/...``); ET label 4.
* 2021: ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``; ET label 4.
* 2023+: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``; ET label 3.

A case is the set of files in one folder sharing a prefix; the segmentation is optional
(validation/test cases have none and are still found, for inference).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# Canonical modality order everywhere in the project: (T1, T1ce, T2, FLAIR).
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
# BraTS 2023+ names of the same four modalities, in the same order.
MODALITIES_2023: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")
_TO_CANONICAL = {**{m: m for m in MODALITIES}, **dict(zip(MODALITIES_2023, MODALITIES))}

_FILE_RE = re.compile(
    r"^(?P<case>.+?)[_-](?P<mod>t1ce|t1c|t1n|t1|t2w|t2f|t2|flair|seg)\.nii(?P<gz>\.gz)?$",
    re.IGNORECASE,
)
# BraTS 2018-2020 ids: BraTS19_<INST>_<id>_1; INST is 2013, CBICA, TCIA01..13, TMC ...
_INSTITUTION_RE = re.compile(r"^BraTS\d{2}_(?P<inst>[A-Za-z0-9]+)_.+$")
_NOT_INSTITUTIONS = {"training", "validation", "testing"}


class DataError(ValueError):
    """Bad input for one case; the message names the case and the file."""

    def __init__(self, case: str, file: str | os.PathLike | None, reason: str) -> None:
        self.case = case
        self.file = str(file) if file is not None else None
        self.reason = reason
        where = f"case {case}" + (f", file {self.file}" if self.file else "")
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case as found on disk.

    ``images`` maps the canonical modality names (:data:`MODALITIES`) to paths; ``missing``
    lists the modalities (in the naming of the case's layout) for which no file was found;
    ``seg`` is ``None`` for cases without a segmentation. ``et_label`` is 4 for the
    2019-2021 naming and 3 for the 2023+ naming. ``grade`` is ``"HGG"``/``"LGG"`` when the case
    sits in such a folder (BraTS 2019 layout), else ``None``. ``problems`` holds
    file-level issues found during discovery (e.g. a modality present twice).
    """

    case_id: str
    directory: Path
    images: dict[str, Path]
    seg: Path | None
    et_label: int
    layout: str
    grade: str | None = None
    missing: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default=())

    def image_paths(self) -> list[Path]:
        """The four modality paths in canonical order; raises :class:`DataError` if one lacks."""
        self.check_complete()
        return [self.images[m] for m in MODALITIES]

    def check_complete(self) -> None:
        """Raise :class:`DataError` naming the first missing file or discovery problem."""
        if self.problems:
            raise DataError(self.case_id, self.directory, self.problems[0])
        if self.missing:
            sep = "-" if self.layout == "2023" else "_"
            expected = self.directory / f"{self.case_id}{sep}{self.missing[0]}.nii.gz"
            raise DataError(
                self.case_id, expected,
                f"missing modality {self.missing[0]!r} (need all of {', '.join(self._names())})",
            )

    def _names(self) -> tuple[str, ...]:
        return MODALITIES_2023 if self.layout == "2023" else MODALITIES


def institution_of(case_id: str) -> str | None:
    """Institution token of a BraTS 2018-2020 id (``BraTS19_TCIA01_131_1`` -> ``TCIA01``).

    Returns ``None`` for ids that carry none (``BraTS20_Training_001``, 2021 and 2023 ids).
    """
    match = _INSTITUTION_RE.match(case_id)
    if match is None or match["inst"].lower() in _NOT_INSTITUTIONS:
        return None
    return match["inst"]


def discover_cases(root: str | os.PathLike) -> list[CaseFiles]:
    """All BraTS cases below ``root`` (sorted by case id).

    Raises ``FileNotFoundError`` if ``root`` is not a folder and ``DataError`` if two folders
    hold the same case id. Cases with missing modalities are returned with ``missing`` set, so
    the caller can report them (``prepare`` skips them).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BraTS root is not a folder: {root}")
    groups: dict[tuple[Path, str], dict[str, list[Path]]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            match = _FILE_RE.match(name)
            if match is None:
                continue
            key = (Path(dirpath), match["case"])
            groups.setdefault(key, {}).setdefault(match["mod"].lower(), []).append(
                Path(dirpath) / name
            )
    cases: dict[str, CaseFiles] = {}
    for (directory, case_id), files in groups.items():
        new_style = any(m in files for m in MODALITIES_2023)
        old_style = any(m in files for m in MODALITIES)
        problems: list[str] = []
        if new_style and old_style:
            problems.append("mixes 2019-2021 (t1/t1ce/t2/flair) and 2023 (t1n/t1c/t2w/t2f) names")
        names = MODALITIES_2023 if new_style else MODALITIES
        for mod, paths in sorted(files.items()):
            if len(paths) > 1:
                problems.append(f"modality {mod!r} present twice: {', '.join(map(str, paths))}")
        images = {_TO_CANONICAL[m]: files[m][0] for m in names if m in files}
        missing = tuple(m for m in names if m not in files)
        parent = directory.name.upper()
        grade = directory.parent.name.upper() if directory.parent.name.upper() in ("HGG", "LGG") else None
        if parent in ("HGG", "LGG"):
            grade = parent
        if new_style:
            layout = "2023"
        elif grade is not None or re.match(r"^BraTS(1\d|20)_", case_id):
            layout = "2019"
        else:
            layout = "2021"
        if case_id in cases:
            raise DataError(case_id, directory, f"case id also found in {cases[case_id].directory}")
        cases[case_id] = CaseFiles(
            case_id=case_id,
            directory=directory,
            images=images,
            seg=files["seg"][0] if "seg" in files else None,
            et_label=3 if new_style else 4,
            layout=layout,
            grade=grade,
            missing=missing,
            problems=tuple(problems),
        )
    return [cases[k] for k in sorted(cases)]
