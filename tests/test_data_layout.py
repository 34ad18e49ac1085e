"""Discovery of every BraTS layout, and every site source, on files the tests write."""

from __future__ import annotations

import pytest

from m4fuse.cli.main import main
from m4fuse.data import (
    discover_cases,
    institution_of,
    institution_sites,
    random_sites,
    read_site_csv,
    split_cases,
    write_partition_csv,
)
from m4fuse.data.fake import write_fake_case


def test_layout_2019_hgg_lgg(tmp_path):
    write_fake_case(tmp_path, "BraTS19_CBICA_AAB_1", "2019", grade="HGG")
    write_fake_case(tmp_path, "BraTS19_2013_10_1", "2019", grade="LGG", ext=".nii")
    cases = {c.case_id: c for c in discover_cases(tmp_path)}
    assert sorted(cases) == ["BraTS19_2013_10_1", "BraTS19_CBICA_AAB_1"]
    assert cases["BraTS19_CBICA_AAB_1"].grade == "HGG" and cases["BraTS19_2013_10_1"].grade == "LGG"
    assert all(c.layout == "2019" and c.et_label == 4 and not c.missing for c in cases.values())
    assert cases["BraTS19_2013_10_1"].images["t1ce"].name == "BraTS19_2013_10_1_t1ce.nii"


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_layout_2021(tmp_path, ext):
    write_fake_case(tmp_path, "BraTS2021_00000", "2021", ext=ext)
    (case,) = discover_cases(tmp_path)
    assert case.layout == "2021" and case.et_label == 4 and case.grade is None
    assert [p.name for p in case.image_paths()] == [f"BraTS2021_00000_{m}{ext}" for m in ("t1", "t1ce", "t2", "flair")]
    assert case.seg.name == f"BraTS2021_00000_seg{ext}"


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_layout_2023_gli(tmp_path, ext):
    write_fake_case(tmp_path, "BraTS-GLI-00000-000", "2023", ext=ext)
    write_fake_case(tmp_path, "BraTS-GLI-00001-000", "2023", ext=ext, with_seg=False)  # validation case
    a, b = discover_cases(tmp_path)
    assert a.layout == "2023" and a.et_label == 3
    # canonical order (T1, T1ce, T2, FLAIR) = (t1n, t1c, t2w, t2f)
    assert [p.name.split("-")[-1] for p in a.image_paths()] == [f"{m}{ext}" for m in ("t1n", "t1c", "t2w", "t2f")]
    assert b.seg is None and not b.missing


def test_institution_tokens():
    assert institution_of("BraTS19_CBICA_AAB_1") == "CBICA"
    assert institution_of("BraTS19_2013_10_1") == "2013"
    assert institution_of("BraTS19_TCIA01_131_1") == "TCIA01"
    assert institution_of("BraTS19_TMC_06290_1") == "TMC"
    assert institution_of("BraTS20_Training_001") is None
    assert institution_of("BraTS2021_00000") is None
    with pytest.raises(ValueError, match="BraTS20_Training_001.*--partition-csv"):
        institution_sites(["BraTS19_TMC_06290_1", "BraTS20_Training_001"])


@pytest.mark.parametrize("header", [("Partition_ID", "Subject_ID"), ("Subject_ID", "Partition_ID")])
def test_fets_csv_either_order(tmp_path, header):
    rows = [("1", "BraTS2021_00000"), ("2", "BraTS2021_00001"), ("1", "BraTS2021_00002")]
    text = ",".join(header) + "\n" + "".join(
        (f"{p},{s}\n" if header[0] == "Partition_ID" else f"{s},{p}\n") for p, s in rows)
    (tmp_path / "p.csv").write_text(text)
    assert read_site_csv(tmp_path / "p.csv") == {"BraTS2021_00000": "1", "BraTS2021_00001": "2", "BraTS2021_00002": "1"}


def test_user_csv(tmp_path):
    (tmp_path / "a.csv").write_text("hospital,case,age\nA,c1,50\nB,c2,60\n")
    assert read_site_csv(tmp_path / "a.csv") == {"c1": "A", "c2": "B"}
    (tmp_path / "b.csv").write_text("who,where\nc1,X\nc2,Y\n")  # unknown names: overlap decides
    assert read_site_csv(tmp_path / "b.csv", case_ids=["c1", "c2"]) == {"c1": "X", "c2": "Y"}
    (tmp_path / "c.csv").write_text("pid,centre_code,x\nc1,Q,1\n")
    assert read_site_csv(tmp_path / "c.csv", case_column="pid", site_column="centre_code") == {"c1": "Q"}
    with pytest.raises(ValueError, match="c.csv.*cannot tell"):
        read_site_csv(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("Subject_ID,Partition_ID\nc1,1\nc1,2\n")
    with pytest.raises(ValueError, match="d.csv:3.*c1"):
        read_site_csv(tmp_path / "d.csv")


def test_partition_csv_roundtrip(tmp_path):
    mapping = {"c3": "B", "c1": "A", "c2": "B"}
    write_partition_csv(tmp_path / "s.csv", mapping)
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "Partition_ID,Subject_ID"
    assert read_site_csv(tmp_path / "s.csv") == mapping


def test_random_sites_stratified_and_seeded():
    ids = [f"c{i:02d}" for i in range(30)]
    strata = {c: ("LGG" if i < 9 else "HGG") for i, c in enumerate(ids)}
    a = random_sites(ids, 3, seed=1, strata=strata)
    assert a == random_sites(ids, 3, seed=1, strata=strata)
    assert a != random_sites(ids, 3, seed=2, strata=strata)
    assert sorted(set(a.values())) == ["site0", "site1", "site2"]
    for site in ("site0", "site1", "site2"):
        members = [c for c, s in a.items() if s == site]
        assert len(members) == 10
        assert sum(strata[c] == "LGG" for c in members) == 3  # 9 LGG spread evenly
    with pytest.raises(ValueError, match="2 cases into 3"):
        random_sites(["a", "b"], 3)


def test_split_deterministic_disjoint():
    ids = [f"c{i}" for i in range(20)]
    s = split_cases(ids, seed=3, salt="A")
    assert s == split_cases(list(reversed(ids)), seed=3, salt="A")
    assert s != split_cases(ids, seed=4, salt="A")
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (14, 3, 3)
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(ids)
    assert split_cases(["x"], 0)["train"] == ["x"]
    with pytest.raises(ValueError, match="0.6"):
        split_cases(ids, val_fraction=0.6, test_fraction=0.5)


def test_sites_command(tmp_path, capsys):
    for cid in ("BraTS19_CBICA_AAA_1", "BraTS19_CBICA_AAB_1", "BraTS19_TCIA01_131_1"):
        write_fake_case(tmp_path / "root", cid, "2019", grade="HGG")
    out = tmp_path / "sites.csv"
    assert main(["data", "sites", str(tmp_path / "root"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CBICA" in text and "TCIA01" in text
    assert read_site_csv(out) == {"BraTS19_CBICA_AAA_1": "CBICA", "BraTS19_CBICA_AAB_1": "CBICA",
                                  "BraTS19_TCIA01_131_1": "TCIA01"}
    # the written CSV is read back by --partition-csv
    assert main(["data", "sites", str(tmp_path / "root"), "--partition-csv", str(out)]) == 0
    assert main(["data", "sites", str(tmp_path / "root"), "--random", "2", "--seed", "1"]) == 0
    assert "site1" in capsys.readouterr().out


def test_sites_command_2021_needs_csv(tmp_path, capsys):
    write_fake_case(tmp_path, "BraTS2021_00000", "2021")
    assert main(["data", "sites", str(tmp_path)]) == 2
    assert "no institution token" in capsys.readouterr().err
