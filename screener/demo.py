"""``screener demo``: the whole service on one machine, fed by bundled example studies.

Starts the embedded service (listener, workers, reconciler; SQLite, onnxruntime, the
SQLite broker) in a fresh data directory, sends the bundled studies to its listener by
C-STORE exactly as a PACS would, waits until every study has been screened and its SR and
heatmaps written, and shows the results. The images are real public chest radiographs
(NIH ChestX-ray14 and CC BY 3.0 sources; see NOTICE). Not for diagnostic use.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlmodel import col, select

from screener.db.models import TERMINAL_STATES, ScreeningJob, Study
from screener.db.session import session_scope
from screener.imaging.views import view_caption
from screener.settings import ListenerSettings, ReconcilerSettings, Settings

DEMO_AE_TITLE = "DEMOPACS"


@dataclass
class DemoStudy:
    key: str
    study_instance_uid: str
    files: list[Path]
    state: str = "not received"
    reason: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    data_dir: Path
    studies: list[DemoStudy]
    sent: int
    seconds: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(
            s.state in ("delivered", "completed") for s in self.studies
        )

    @property
    def outbox(self) -> Path:
        return self.data_dir / "outbox"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "data_dir": str(self.data_dir),
            "sent_instances": self.sent,
            "seconds": round(self.seconds, 1),
            "studies": [
                {"key": s.key, "state": s.state, "reason": s.reason, "result": s.result}
                for s in self.studies
            ],
        }

    def render(self, console: Console) -> None:
        first = next((s.result for s in self.studies if s.result), {})
        table = Table(
            title=f"pacs-screener demo: model {first.get('model', '?')}, threshold "
            f"{first.get('threshold', '?')} (version {first.get('threshold_version', '?')})",
            caption=first.get("disclaimer", "NOT FOR DIAGNOSTIC USE."),
        )
        for column in ("study", "img", "view (from)", "COVID", "result", "outputs"):
            table.add_column(column, overflow="fold")
        for study in self.studies:
            images = study.result.get("images") or []
            outputs = [Path(o).name for o in study.result.get("outputs") or []]
            n_sr = sum(1 for o in outputs if o.startswith("sr"))
            summary = f"{n_sr} SR, {len(outputs) - n_sr} SC"
            if not images:
                state, reason = escape(study.state), escape(study.reason or "")
                table.add_row(escape(study.key), "-", "-", "-", state, reason)
            for index, image in enumerate(images):
                probs = image.get("probabilities") or {}
                score = probs.get("covid")
                positive = image.get("covid_positive")
                if positive is None:
                    verdict = f"not screened: {escape(str(image.get('skip_reason') or '-'))}"
                else:
                    verdict = "[red]POSITIVE[/red]" if positive else "negative"
                table.add_row(
                    escape(study.key) if index == 0 else "",
                    str(index + 1),
                    escape(view_caption(image["view"], image["view_source"])),
                    "-" if score is None else f"{score:.3f}",
                    verdict,
                    summary if index == 0 else "",
                )
        console.print(table)
        explanation = operating_point_explanation(first)
        if explanation:  # once, not per study: what a POSITIVE call at this threshold means
            console.print(explanation, markup=False)
        console.print(f"SR and heatmap files (DICOM): {self.outbox}", markup=False)
        for study in self.studies:
            for output in study.result.get("outputs") or []:
                console.print(f"  {study.key}: {output}", soft_wrap=True, markup=False)
        console.print(f"database, spool and logs: {self.data_dir}", markup=False)


def operating_point_explanation(result: dict[str, Any]) -> str:
    """The operating point of a result's JSON (threshold, version, operating point text)
    explained as the SR and the heatmaps state it."""
    from screener.reports.operating_point import statement_for
    from screener.results import ThresholdInfo

    if result.get("threshold") is None:
        return ""
    info = ThresholdInfo(
        value=float(result["threshold"]),
        version=int(result.get("threshold_version", 0)),
        operating_point=str(result.get("operating_point") or ""),
    )
    return statement_for(info).explanation()


def bundled_studies() -> list[DemoStudy]:
    """The example studies shipped in ``screener/demo_data`` (catalogue.json)."""
    base = resources.files("screener.demo_data")
    catalogue = json.loads(base.joinpath("catalogue.json").read_text())
    studies = []
    for entry in catalogue:
        files = [Path(str(base.joinpath(image["file"]))) for image in entry["images"]]
        studies.append(DemoStudy(entry["key"], entry["study_instance_uid"], files))
    return studies


def send_studies(host: str, port: int, called_ae: str, files: list[Path]) -> int:
    """C-STORE ``files`` over one association, as a PACS would; returns successes."""
    from pydicom import dcmread
    from pynetdicom import AE

    from screener.dicom.association_answer import AssociationAnswer

    datasets = [dcmread(path) for path in files]
    ae = AE(ae_title=DEMO_AE_TITLE)
    for pair in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(pair[0], [pair[1]])
    answer = AssociationAnswer()
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=answer.handlers)
    if not assoc.is_established:
        raise ConnectionError(f"{called_ae}@{host}:{port}: {answer.outcome(assoc)}")
    ok = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                ok += 1
    finally:
        assoc.release()
    return ok


def study_states(settings: Settings, uids: list[str]) -> dict[str, tuple[str, str | None, Any]]:
    """Latest job state, reason and result per Study Instance UID."""
    states: dict[str, tuple[str, str | None, Any]] = {}
    with session_scope(settings.database_url) as session:
        for study in session.exec(select(Study).where(col(Study.study_instance_uid).in_(uids))):
            job = session.exec(
                select(ScreeningJob)
                .where(ScreeningJob.study_id == study.id)
                .order_by(col(ScreeningJob.id).desc())
                .limit(1)
            ).first()
            states[study.study_instance_uid] = (
                ("received" if job is None else job.state),
                None if job is None else job.reason,
                None if job is None else job.result,
            )
    return states


def demo_settings(data_dir: Path) -> Settings:
    """Embedded defaults in ``data_dir``, with a short quiet period and a free port.

    No destination, whatever SCREENER_DELIVERY__DESTINATIONS or SCREENER_CONFIG say: the
    demo's example SRs and heatmaps must never reach a site's real PACS. The workers get
    these settings (not the environment), so the override holds for them too.
    """
    settings = Settings(
        data_dir=data_dir,
        database_url="",
        broker_url="",
        study_quiet_seconds=2,
        listener=ListenerSettings(
            port=0, host="127.0.0.1", allowed_calling_ae_titles=[DEMO_AE_TITLE]
        ),
        reconciler=ReconcilerSettings(interval_seconds=5, stale_seconds=60, max_attempts=3),
    )
    settings.delivery.destinations = []
    return settings


def run_demo(
    *, data_dir: Path | None = None, timeout_s: float = 240, console: Console | None = None
) -> DemoResult:
    from workers.runner import EmbeddedService

    console = console or Console(stderr=True)
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="pacs-screener-demo-"))
    settings = demo_settings(data_dir)
    studies = bundled_studies()
    started = time.monotonic()
    service = EmbeddedService(settings, log_dir=data_dir / "logs")
    with console.status("starting the embedded service (listener, workers, reconciler)"):
        service.start()
    try:
        files = [f for s in studies for f in s.files]
        console.print(
            f"listener {settings.listener.ae_title} on 127.0.0.1:{service.port}; sending "
            f"{len(files)} instances of {len(studies)} studies by C-STORE as {DEMO_AE_TITLE}",
            markup=False,
        )
        sent = send_studies("127.0.0.1", service.port, settings.listener.ae_title, files)
        uids = [s.study_instance_uid for s in studies]
        timed_out = True
        with console.status("screening (study quiet period, prepare, infer, report)") as status:
            while time.monotonic() - started < timeout_s:
                states = study_states(settings, uids)
                done = [u for u, (state, _, _) in states.items() if state in TERMINAL_STATES]
                status.update(f"screening: {len(done)}/{len(uids)} studies finished")
                if len(done) == len(uids):
                    timed_out = False
                    break
                dead = service.check_children()
                if dead:
                    where = escape(f"{dead}; see {data_dir / 'logs'}")
                    console.print(f"[red]worker(s) exited: {where}[/red]")
                    break
                time.sleep(0.5)
        states = study_states(settings, uids)
        for study in studies:
            state, reason, result = states.get(
                study.study_instance_uid, ("not received", None, None)
            )
            study.state, study.reason, study.result = state, reason, result or {}
    finally:
        service.stop()
    return DemoResult(data_dir, studies, sent, time.monotonic() - started, timed_out)
