"""CT ingestion (NIfTI/NRRD/DICOM, dataset layouts), the paper's preprocessing, the phantom dataset."""

from lad.data.labels import LAD_LABELS, ORGAN_LABELS, ORGAN_NAMES


def __getattr__(name):  # lazy: keep `import lad.data` light
    if name == "PreparedDataset":
        from lad.data.dataset import PreparedDataset

        return PreparedDataset
    raise AttributeError(name)


__all__ = ["PreparedDataset", "ORGAN_LABELS", "ORGAN_NAMES", "LAD_LABELS"]
