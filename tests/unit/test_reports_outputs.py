"""SR + heatmap SC written from screening results: content, validity, identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from screener.identity import PRODUCT_NAME
from screener.reports.common import PredecessorRef
from screener.reports.heatmap import render
from screener.reports.operating_point import statement_for
from screener.reports.writer import write_study_outputs
from screener.results import ThresholdInfo
from screener.settings import Settings
from tests.dicom_validation import assert_valid, dciodvfy, dsrdump
from tests.report_results import concept_meaning, content_items, make_result

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _split(paths: list[Path]) -> tuple[Dataset, list[Dataset]]:
    datasets = [pydicom.dcmread(p) for p in paths]
    srs = [d for d in datasets if d.SOPClassUID == SR_CLASS]
    assert len(srs) == 1
    return srs[0], [d for d in datasets if d.SOPClassUID == SC_CLASS]


@pytest.fixture
def settings_(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def test_screened_study_sr_and_heatmap(tmp_path: Path, settings_: Settings) -> None:
    result, sources = make_result(tmp_path, ["PA", "LATERAL"], scores=[0.81, 0.0])
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    assert [str(p) for p in paths] == result.outputs
    sr, scs = _split(paths)
    assert len(scs) == 1  # the lateral view gets no heatmap
    source = pydicom.dcmread(sources[0], stop_before_pixels=True)
    sc = scs[0]

    for ds in (sr, sc):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.ManufacturerModelName == PRODUCT_NAME
        assert ds.Manufacturer == settings_.reports.manufacturer
        assert "cxr-covid-effnetlite0@1.0.0" in list(ds.SoftwareVersions)
        assert "not for diagnosis" in ds.SeriesDescription
        equipment = ds.ContributingEquipmentSequence
        assert any(
            e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
            and e.get("ManufacturerModelName") == PRODUCT_NAME
            for e in equipment
        )

    # SR header flags are honest
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.ContentDate and sr.ContentTime

    items = content_items(list(sr.ContentSequence))
    nums = [i for i in items if i.ValueType == "NUM"]
    covid_prob = [
        n
        for n in nums
        if concept_meaning(n) == "Probability"
        and n.ConceptNameCodeSequence[0].CodeValue == "122157"
    ]
    values = sorted(float(n.MeasuredValueSequence[0].NumericValue) for n in covid_prob)
    assert values == pytest.approx(sorted([0.81, 0.19 * 0.6]), abs=1e-6)
    units = {
        n.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for n in covid_prob
    }
    assert units == {"1"}
    # the Image Library's pixel counts are the only other numbers
    others = {n.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for n in nums}
    assert others == {"1", "{pixels}"}
    findings = {
        i.ConceptCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "CODE" and concept_meaning(i) == "Finding"
    }
    assert findings == {"840539006", "233604007"}
    evaluations = {
        (i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
        for i in items
        if i.ValueType == "CODE" and concept_meaning(i) in ("COVID-19", "Pneumonia")
    }
    assert evaluations == {("840539006", "52101004"), ("233604007", "272519000")}
    sites = {
        i.ConceptCodeSequence[0].CodeValue for i in items if concept_meaning(i) == "Finding Site"
    }
    assert sites == {"39607008"}
    params = [i.TextValue for i in items if concept_meaning(i) == "Algorithm Parameters"]
    assert "covid_threshold=0.420000" in params and "threshold_version=3" in params
    assert "target_sensitivity=0.95" in params
    observer = {
        i.ConceptCodeSequence[0].CodeValue for i in items if concept_meaning(i) == "Observer Type"
    }
    assert observer == {"121007"}  # device
    serial = [i.TextValue for i in items if concept_meaning(i) == "Device Observer Serial Number"]
    assert serial == ["ab12cd34ef56"]

    refs = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"
    }
    all_sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sources}
    assert refs == all_sources | {sc.SOPInstanceUID}
    # Image Library (TID 1600): one entry per source image, lateral included
    library = next(i for i in items if concept_meaning(i) == "Image Library")
    entries = [
        e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for e in content_items(list(library.ContentSequence))
        if e.ValueType == "IMAGE"
    ]
    assert sorted(entries) == sorted(all_sources)
    # Qualitative Evaluations is TID 1500's (C0034375, UMLS), not (126010, DCM)
    names = [i.ConceptNameCodeSequence[0] for i in items if i.ValueType == "CONTAINER"]
    containers = {(n.CodeValue, n.CodingSchemeDesignator) for n in names}
    assert ("C0034375", "UMLS") in containers and ("126010", "DCM") in containers
    qualitative = next(i for i in items if concept_meaning(i) == "Qualitative Evaluations")
    assert qualitative.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    summary = [i.TextValue for i in items if concept_meaning(i) == "Summary"]
    assert summary and "POSITIVE" in summary[0] and "0.810" in summary[0]
    assert settings_.disclaimer in texts
    assert any("LATERAL" in t and "NOT SCREENED" in t for t in texts)

    # the SC: RGB, burned in, references its source, the film at display geometry inside
    # text margins (the same pixels as rendering the image again)
    image = result.images[0]
    assert image.display_image is not None
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.BurnedInAnnotation == "YES"
    rendering = render(
        image,
        result,
        settings_.disclaimer,
        statement=statement_for(result.threshold, result.model, settings_),
    )
    assert rendering.film.gray.shape == image.display_image.shape
    assert (sc.Rows, sc.Columns) == rendering.pixels.shape[:2]
    assert sc.Rows > image.display_image.shape[0] and rendering.top > 0
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert settings_.disclaimer in sc.ImageComments
    pixels = sc.pixel_array
    assert np.array_equal(pixels, rendering.pixels)
    # the CAM is coloured (channels differ) where it is hot, and grey far from it
    rows, cols = image.display_image.shape
    film = pixels[rendering.top : rendering.top + rows, rendering.left : rendering.left + cols]
    hot = film[int(0.55 * rows), int(0.3 * cols)].astype(int)
    assert hot.max() - hot.min() > 40
    cold = film[int(0.5 * rows), int(0.5 * cols)].astype(int)
    assert cold.max() - cold.min() <= 1

    # highdicom reads it back as a TID 1500 report: two groups, the COVID one Present
    import highdicom as hd

    groups = hd.sr.srread(paths[0]).content.get_image_measurement_groups()  # type: ignore[attr-defined]
    assert [g.finding_type.value for g in groups] == ["840539006", "233604007"]
    covid = groups[0]
    assert covid.get_measurements()[0].value == pytest.approx(0.81)
    assert covid.get_qualitative_evaluations()[0].value.value == "52101004"

    for path in paths:
        assert_valid(path)
    dump = dsrdump(paths[0])
    assert "Imaging Measurement Report" in dump and "Probability" in dump
    assert '(840539006,SCT,"COVID-19")' in dump


def test_lateral_only_study_gets_sr_saying_no_frontal_image(
    tmp_path: Path, settings_: Settings
) -> None:
    result, _ = make_result(tmp_path, ["LATERAL"])
    assert result.status == "no_frontal_image"
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    sr, scs = _split(paths)
    assert scs == []
    items = content_items(list(sr.ContentSequence))
    summary = next(i.TextValue for i in items if concept_meaning(i) == "Summary")
    assert "no frontal (AP/PA) chest image was screened" in summary
    assert not [i for i in items if i.ValueType == "NUM" and concept_meaning(i) == "Probability"]
    assert sr.CompletionFlag == "COMPLETE"
    assert_valid(paths[0])
    assert "no frontal" in dsrdump(paths[0])


def test_undecodable_image_is_listed_as_not_screened(tmp_path: Path, settings_: Settings) -> None:
    result, sources = make_result(tmp_path, ["PA", "AP"], scores=[0.1, 0.0], undecodable={1})
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    sr, scs = _split(paths)
    assert len(scs) == 1
    failed_uid = pydicom.dcmread(sources[1], stop_before_pixels=True).SOPInstanceUID
    texts = [i.TextValue for i in content_items(list(sr.ContentSequence)) if i.ValueType == "TEXT"]
    line = next(t for t in texts if failed_uid in t)
    assert "NOT SCREENED" in line and "decode failed" in line
    assert sr.CompletionFlag == "PARTIAL"  # one image that should have been read was not
    for path in paths:
        assert_valid(path)


def test_all_images_undecodable_still_gives_an_sr(tmp_path: Path, settings_: Settings) -> None:
    result, _ = make_result(tmp_path, ["PA"], undecodable={0})
    assert result.status == "failed"
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    sr, scs = _split(paths)
    assert scs == []
    summary = next(
        i.TextValue
        for i in content_items(list(sr.ContentSequence))
        if concept_meaning(i) == "Summary"
    )
    assert summary.startswith("AI screening failed") and "decode failed" in summary
    assert sr.CompletionFlag == "PARTIAL"
    assert_valid(paths[0])


def test_uids_are_deterministic_and_rescreen_references_predecessor(
    tmp_path: Path, settings_: Settings
) -> None:
    result, _ = make_result(tmp_path, ["PA"], scores=[0.3])
    first = [pydicom.dcmread(p) for p in write_study_outputs(result, tmp_path / "a", settings_)]
    result.outputs.clear()
    again = [pydicom.dcmread(p) for p in write_study_outputs(result, tmp_path / "b", settings_)]
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    assert [d.SeriesInstanceUID for d in first] == [d.SeriesInstanceUID for d in again]
    assert all(d.SOPInstanceUID.startswith("2.25.") for d in first)

    old_sr = first[0]
    pred = PredecessorRef(
        study_instance_uid=old_sr.StudyInstanceUID,
        series_instance_uid=old_sr.SeriesInstanceUID,
        sop_instance_uid=old_sr.SOPInstanceUID,
        sop_class_uid=old_sr.SOPClassUID,
    )
    # identical re-screen: never references itself
    same = write_study_outputs(result, tmp_path / "c", settings_, predecessors=[pred])
    assert "PredecessorDocumentsSequence" not in pydicom.dcmread(same[0])

    result.threshold = ThresholdInfo(value=0.25, version=4, target_sensitivity=0.97)
    for image in result.images:
        image.covid_positive = (image.covid_score or 0.0) >= 0.25
    paths = write_study_outputs(result, tmp_path / "d", settings_, predecessors=[pred])
    new_sr = pydicom.dcmread(paths[0])
    assert new_sr.SOPInstanceUID != old_sr.SOPInstanceUID
    item = new_sr.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == old_sr.StudyInstanceUID
    series = item.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == old_sr.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    assert_valid(paths[0])


def test_negative_heatmap_text_and_large_image(tmp_path: Path, settings_: Settings) -> None:
    from tests.report_results import synthetic_pixels

    big = synthetic_pixels(1100, 900, seed=3)
    result, _ = make_result(tmp_path, ["AP"], scores=[0.05], pixels=big)
    assert result.images[0].covid_positive is False
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    _, scs = _split(paths)
    px = scs[0].pixel_array
    image = result.images[0]
    assert image.display_image is not None
    rendering = render(image, result, settings_.disclaimer)
    assert rendering.film.gray.shape == image.display_image.shape
    assert px.shape == rendering.pixels.shape
    # text band at the top is drawn: black background with bright glyph pixels
    band = px[: rendering.top]
    assert (band.max(axis=2) < 10).mean() > 0.5 and (band.max(axis=2) > 200).any()
    assert np.any(band[..., 1] > band[..., 0] + 50)  # green NEGATIVE text
    assert_valid(paths[1])


def test_parametric_map_of_the_cam(tmp_path: Path, settings_: Settings) -> None:
    settings_.reports.parametric_map = True
    from tests.report_results import synthetic_pixels

    result, sources = make_result(tmp_path, ["PA"], scores=[0.9], pixels=synthetic_pixels(700, 600))
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    pmaps = [pydicom.dcmread(p) for p in paths if p.name.startswith("pmap_")]
    assert len(pmaps) == 1
    pm = pmaps[0]
    source = pydicom.dcmread(sources[0])
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert (pm.Rows, pm.Columns) == (source.Rows, source.Columns)  # source grid, not display
    assert pm.StudyInstanceUID == source.StudyInstanceUID
    assert pm.ManufacturerModelName == PRODUCT_NAME
    assert pm.FrameOfReferenceUID.startswith("2.25.")
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("130402", "DCM")
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    values = pm.pixel_array.astype(np.float64) * float(mapping.RealWorldValueSlope)
    rows, cols = values.shape
    assert values.max() == pytest.approx(1.0, abs=0.01)
    peak = np.unravel_index(np.argmax(values), values.shape)
    assert abs(peak[0] / rows - 0.55) < 0.05 and abs(peak[1] / cols - 0.3) < 0.05
    derivation = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    result_v = assert_valid(paths[-1])
    assert not result_v.errors


def test_heatmap_respects_configured_maximum_size(tmp_path: Path, settings_: Settings) -> None:
    settings_.reports.heatmap_max_size = 200
    result, _ = make_result(tmp_path, ["PA"], scores=[0.5])
    display = result.images[0].display_image
    assert display is not None and max(display.shape) > 200
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    _, scs = _split(paths)
    # the film is at most 200 px; the margins around it hold the text
    rendering = render(result.images[0], result, settings_.disclaimer, max_size=200)
    film_rows, film_cols = rendering.film.gray.shape
    assert max(film_rows, film_cols) == 200
    ratio = display.shape[0] / display.shape[1]
    assert abs(film_rows / film_cols - ratio) < 0.02
    assert (scs[0].Rows, scs[0].Columns) == rendering.pixels.shape[:2]
    assert_valid(paths[1])


def test_lung_contour_is_the_mask_boundary() -> None:
    from screener.reports.heatmap import lung_contour

    mask = np.zeros((9, 9), dtype=bool)
    mask[2:7, 2:7] = True
    edge = lung_contour(mask)
    assert edge.sum() == 16 and not edge[4, 4] and edge[2, 4] and not edge[0, 0]
    assert lung_contour(mask, thickness=2).sum() > edge.sum()


def test_non_latin_disclaimer_switches_to_utf8(tmp_path: Path) -> None:
    from screener.testing.dicom_factory import StudyIdentity

    disclaimer = "仅供研究使用 — NOT FOR DIAGNOSTIC USE."
    settings = Settings(data_dir=tmp_path / "data", disclaimer=disclaimer)
    study = StudyIdentity.new(patient_name="MÜLLER^JÖRG")
    result, _ = make_result(tmp_path, ["PA"], study=study)
    paths = write_study_outputs(result, tmp_path / "out", settings)
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == "MÜLLER^JÖRG"  # re-encoded, not mangled
        assert_valid(path)
    sr = pydicom.dcmread(paths[0])
    assert disclaimer in [i.get("TextValue") for i in content_items(list(sr.ContentSequence))]
    # Latin-1 text in a Latin-1 study keeps the source's character set
    result.outputs.clear()
    latin = Settings(data_dir=tmp_path / "data", disclaimer="Nicht für die Diagnose.")
    kept = write_study_outputs(result, tmp_path / "out2", latin)
    assert pydicom.dcmread(kept[0]).SpecificCharacterSet == "ISO_IR 100"


def test_source_missing_type2_attributes_still_gives_valid_outputs(
    tmp_path: Path, settings_: Settings
) -> None:
    result, sources = make_result(tmp_path, ["PA"])
    ds = pydicom.dcmread(sources[0])
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "PatientID"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(sources[0])
    paths = write_study_outputs(result, tmp_path / "out", settings_)
    for path in paths:
        out = pydicom.dcmread(path)
        assert out.PatientID == "" and out.StudyInstanceUID == ds.StudyInstanceUID
        check = dciodvfy(path)
        assert not check.errors, check.output
        # the only remarks are those the source itself earns: no Patient ID / Study ID
        assert all(
            w.endswith(("DICOMDIR - Patient ID", "DICOMDIR - Study ID")) for w in check.warnings
        ), check.output


def test_no_readable_source_is_an_error_not_a_wrong_patient(
    tmp_path: Path, settings_: Settings
) -> None:
    result, sources = make_result(tmp_path, ["PA"])
    sources[0].unlink()
    with pytest.raises(ValueError, match="readable source"):
        write_study_outputs(result, tmp_path / "out", settings_)
