"""Imaging: DICOM decoding to MONOCHROME2, view reading from tags, pre-processing schemes."""
