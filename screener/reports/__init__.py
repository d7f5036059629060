"""DICOM outputs of a screening: Structured Report, heatmap secondary captures, parametric map."""
