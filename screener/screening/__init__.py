"""The screening stages, one module each; the workers and ``screener screen`` chain them.

- :mod:`.prepare` (CPU): DICOM file -> :class:`~.prepare.PreparedImage` (decoded, tagged
  view, display and working image, the first engine's input); never raises for bad input.
- :mod:`.models`: the loaded engines (:class:`~.models.ScreeningModels`) and the CPU glue
  around the two engine calls (segmenter + view head, then classifier + heat map),
  probability calibration and the call at the threshold.
- :mod:`.view_decision`: tags and the image classifier vote on the view.
- :mod:`.cam`: heat-map post-processing (lung fraction, maps to the display image,
  occlusion sensitivity geometry).
- :mod:`.study_result`: per-image results -> one :class:`~screener.results.StudyResult`.

The offline path (directory walking, in-process chaining) is
:mod:`screener.offline_screening`. Nothing here imports torch: the run-time path is
onnxruntime (or TensorRT) only.
"""
