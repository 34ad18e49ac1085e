"""BraTS data (2019/2020, 2021, 2023+ layouts), sites and splits, preprocessing cache,
training loader, and the synthetic multi-site set (docs/interfaces.md, "Data")."""

from m4fuse.data.cache import (
    CaseRecord,
    PrepareError,
    PrepareReport,
    load_records,
    prepare_dataset,
    read_index,
)
from m4fuse.data.layout import (
    MODALITIES,
    MODALITIES_2023,
    CaseFiles,
    DataError,
    discover_cases,
    institution_of,
)
from m4fuse.data.loader import PreparedCaseDataset, make_loader, train_transforms
from m4fuse.data.partition import read_site_csv, write_partition_csv
from m4fuse.data.preprocess import (
    DEFAULT_SIZE,
    PREPROCESS_VERSION,
    load_volume,
    preprocess_case,
    preprocess_label,
    restore_to_original,
)
from m4fuse.data.sites import (
    SiteSplit,
    institution_sites,
    load_split,
    random_sites,
    scale_site_sizes,
    site_names,
    split_cases,
)
from m4fuse.data.synth import SYNTH_SHAPE, SYNTH_SIZE, SYNTH_VERSION, synthesize

__all__ = [
    "PreparedCaseDataset", "CaseFiles", "CaseRecord", "DataError", "DEFAULT_SIZE", "MODALITIES",
    "MODALITIES_2023", "PREPROCESS_VERSION", "PrepareError", "PrepareReport", "SYNTH_SHAPE",
    "SYNTH_SIZE", "SYNTH_VERSION", "SiteSplit", "discover_cases", "institution_of", "institution_sites",
    "load_records", "load_split", "load_volume", "make_loader", "prepare_dataset",
    "preprocess_case", "preprocess_label", "random_sites", "read_index", "read_site_csv",
    "restore_to_original", "scale_site_sizes", "site_names", "split_cases", "synthesize", "train_transforms",
    "write_partition_csv",
]
