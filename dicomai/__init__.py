"""dicomai: bring AI results into the radiology workflow through DICOM."""

__version__ = "0.1.0"
