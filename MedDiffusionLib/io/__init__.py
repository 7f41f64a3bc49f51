"""Volume file input/output with geometry, and atomic file writes."""
from .atomic import atomic_write_bytes, atomic_write_path, atomic_write_text, check_writable, full_suffix
from .volumes import DICOM_SUFFIXES, SUPPORTED_SUFFIXES, WRITABLE_SUFFIXES, read_dicom_series, read_volume, write_volume

__all__ = [
    "atomic_write_bytes", "atomic_write_path", "atomic_write_text", "check_writable", "full_suffix",
    "DICOM_SUFFIXES", "SUPPORTED_SUFFIXES", "WRITABLE_SUFFIXES", "read_dicom_series", "read_volume", "write_volume",
]
