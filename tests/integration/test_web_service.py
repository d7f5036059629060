"""The HTTP service of a real ``screener serve`` (listener + worker processes), fed by C-STORE:
/healthz, /metrics that move when a study flows through, the JSON API behind HTTP Basic, and
the console in a real browser (Debian chromium + chromedriver, Selenium): log in, open the
study that was sent, its heatmap, retry a dead delivery as admin, be refused as viewer.
Screenshots go to $SCREENER_TEST_ARTIFACTS (default: a temp dir), named in the test output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from screener.demo import send_studies
from screener.testing.dicom_factory import (
    StudyIdentity,
    corpus_image,
    make_study,
    pick_images,
    write_datasets,
)
from tests.dcmtk import StoreSCP, dcmtk_available, free_port
from tests.workers_support import (
    require_models,
    screener_cmd,
    start_process,
    stop_process,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dcmtk_available(), reason="dcmtk (storescp) is not installed"),
]

ADMIN, VIEWER, PASSWORD = "alice", "victor", "correct-horse-battery"
# read at import: the autouse fixture clears SCREENER_* variables before each test
ARTIFACTS_ROOT = os.environ.get("SCREENER_TEST_ARTIFACTS") or tempfile.gettempdir()


@dataclass
class Service:
    base: str
    env: dict[str, str]
    log: Path
    study_uid: str
    before: str  # /metrics before the study was sent


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus exposition (0 when absent)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{\})?")
    match = re.search(r"^" + pattern + r" (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from tests.conftest import CXR_DIR as cxr_dir

    if not (cxr_dir / "manifest.csv").exists():
        pytest.skip(f"corpus not found at {cxr_dir}")
    model_dir = require_models()
    tmp = tmp_path_factory.mktemp("web")
    http_port, dicom_port, dead_port = free_port(), free_port(), free_port()
    with StoreSCP(tmp / "pacs", aet="PACS") as pacs:
        env = {
            "SCREENER_DATA_DIR": str(tmp / "data"),
            "SCREENER_LISTENER__PORT": str(dicom_port),
            "SCREENER_HTTP__PORT": str(http_port),
            "SCREENER_STUDY_QUIET_SECONDS": "1",
            "SCREENER_MODEL__MODEL_DIR": model_dir,
            "SCREENER_DELIVERY__BACKOFF_SECONDS": "0.2",
            "SCREENER_DELIVERY__SWEEP_INTERVAL_SECONDS": "1",
            "SCREENER_DELIVERY__GIVE_UP_AFTER_HOURS": "0.0003",  # ~1 s: a dead letter soon
            "SCREENER_DELIVERY__DESTINATIONS": json.dumps(
                [
                    {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
                    {"ae_title": "DOWN", "host": "127.0.0.1", "port": dead_port},
                ]
            ),
        }
        full_env = {**os.environ, **env}
        # an install: the database first (`users` never creates one), then its users
        done = subprocess.run(
            screener_cmd("db", "upgrade"), env=full_env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        for name, role in ((ADMIN, "admin"), (VIEWER, "viewer")):
            done = subprocess.run(
                screener_cmd("users", "add", name, "--role", role, "--password-stdin"),
                input=PASSWORD + "\n",
                env=full_env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stderr
        log = tmp / "serve.log"
        proc = start_process(screener_cmd("serve"), env, log)
        base = f"http://127.0.0.1:{http_port}"
        try:
            assert wait_for(lambda: _get(base + "/healthz") == 200, 90), log.read_text()[-3000:]
            before = requests.get(base + "/metrics", timeout=10).text
            rows = pick_images(cxr_dir, 1, view="PA", split="test")
            identity = StudyIdentity.new(accession_number="ACC4242")
            files = write_datasets(
                make_study([(corpus_image(cxr_dir, rows[0]["id"]), "PA")], study=identity),
                tmp / "study",
            )
            assert send_studies("127.0.0.1", dicom_port, "SCREENER", files) == len(files)
            uid = identity.study_instance_uid
            auth = (ADMIN, PASSWORD)

            def settled() -> bool:
                assert proc.poll() is None, "serve exited:\n" + log.read_text()[-6000:]
                try:
                    reply = requests.get(base + "/api/studies?limit=5", auth=auth, timeout=10)
                except requests.RequestException:
                    return False  # the assertion above says why when serve is gone
                found = reply.json()
                study = next((s for s in found if s["study_instance_uid"] == uid), None)
                return bool(study and study["deliveries"].get("dead"))

            assert wait_for(settled, 150), log.read_text()[-4000:]
            yield Service(base, env, log, uid, before)
        finally:
            stop_process(proc)


def _get(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return 0


def test_healthz_names_every_check(service: Service) -> None:
    reply = requests.get(service.base + "/healthz", timeout=10)
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "ok"
    assert body["checks"] == {
        "database": "ok",
        "broker": "ok",
        "listener": "ok",
        "workers": "ok",
        "reconciler": "ok",  # serve's reconciler: the only path from received to a job
    }


def test_metrics_move_when_a_study_flows_through(service: Service) -> None:
    text = requests.get(service.base + "/metrics", timeout=10).text
    before = service.before
    assert metric(text, "screener_instances_received_total") >= 1 + metric(
        before, "screener_instances_received_total"
    )
    assert metric(text, "screener_stage_duration_seconds_count", 'stage="infer"') >= 1
    assert metric(text, "screener_stage_duration_seconds_count", 'stage="report"') >= 1
    assert metric(before, "screener_stage_duration_seconds_count", 'stage="infer"') == 0
    lines = text.splitlines()
    assert any('state="delivered"' in line and "PACS@127.0.0.1" in line for line in lines)
    assert any('state="dead"' in line and "DOWN@" in line for line in lines)
    assert re.search(r"^screener_model_info\{.*name=", text, re.M)
    assert re.search(r"^screener_threshold\{version=", text, re.M)
    assert re.search(r"^screener_queue_depth\{stage=\"infer\"\}", text, re.M)
    assert "ACC4242" not in text and service.study_uid not in text  # no identifiers


def test_api_needs_a_user_and_lists_the_study(service: Service) -> None:
    assert requests.get(service.base + "/api/studies", timeout=10).status_code == 401
    wrong = requests.get(service.base + "/api/studies", auth=(ADMIN, "wrong"), timeout=10)
    assert wrong.status_code == 401
    page = requests.get(service.base + "/studies", allow_redirects=False, timeout=10)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    found = requests.get(
        service.base + "/api/studies?limit=10", auth=(VIEWER, PASSWORD), timeout=10
    ).json()
    (study,) = [s for s in found if s["study_instance_uid"] == service.study_uid]
    for key in ("state", "received_at", "covid_score", "covid_positive", "model", "threshold"):
        assert key in study
    assert 0.0 <= study["covid_score"] <= 1.0
    assert study["model"].startswith("cxr-covid")
    assert study["deliveries"]["delivered"] >= 2  # SR + heatmap acknowledged by the PACS
    detail = requests.get(
        service.base + f"/api/studies/{service.study_uid}", auth=(VIEWER, PASSWORD), timeout=10
    ).json()
    kinds = sorted(o["kind"] for o in detail["outputs"])
    assert "sr" in kinds and len(kinds) >= 2, kinds
    for output in detail["outputs"]:  # each its own: delivered to PACS, dead for DOWN
        states = {d["destination"].split("@")[0]: d["state"] for d in output["deliveries"]}
        assert states == {"PACS": "delivered", "DOWN": "dead"}, (output["kind"], states)


def test_console_headers_and_logout_of_a_real_serve(service: Service) -> None:
    """Every answer forbids framing and caching; logging out ends the session on the
    server, so a copy of its cookie stops working."""
    browser = requests.Session()
    form = browser.get(service.base + "/login", timeout=10)
    assert form.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in form.headers["content-security-policy"]
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    signed_in = browser.post(
        service.base + "/login",
        data={"username": VIEWER, "password": PASSWORD, "csrf_token": token.group(1)},
        allow_redirects=False,
        timeout=30,
    )
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/studies"
    copied = browser.cookies.get("screener_session")
    studies = browser.get(service.base + "/studies", timeout=10)
    assert studies.headers["cache-control"] == "no-store"
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', studies.text)
    assert csrf is not None
    out = browser.post(
        service.base + "/logout", data={"csrf_token": csrf.group(1)}, allow_redirects=False
    )
    assert out.status_code == 303
    replay = requests.get(
        service.base + "/api/me", cookies={"screener_session": copied or ""}, timeout=10
    )
    assert replay.status_code == 401


def test_serve_logs_each_process_under_data_dir(service: Service) -> None:
    logs = Path(service.env["SCREENER_DATA_DIR"]) / "logs"
    names = sorted(p.name for p in logs.glob("*.log"))
    # serve's default: one CPU worker per stage queue, and the batching infer consumer
    expected = {"serve.log", "worker-prepare.log", "worker-report.log", "worker-deliver.log"}
    assert expected | {"worker-infer.log"} <= set(names), names
    report = (logs / "worker-report.log").read_text()
    assert f"study {service.study_uid}:" in report  # the per-study result line


def _browser():  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1100"):
        options.add_argument(arg)
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(service=DriverService(driver_path), options=options)


def artifacts_dir() -> Path:
    path = Path(ARTIFACTS_ROOT) / "pacs-screener-browser"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="Debian chromium and chromium-driver are not installed (.ci/run installs them)",
)
def test_console_in_a_real_browser(service: Service) -> None:
    from selenium.webdriver.common.by import By

    shots = artifacts_dir()
    driver = _browser()
    driver.set_page_load_timeout(30)

    def login(name: str) -> None:
        driver.delete_all_cookies()
        driver.get(service.base + "/studies")
        assert "/login" in driver.current_url  # no session: the login form
        driver.find_element(By.ID, "username").send_keys(name)
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login-button").click()
        wait_for(lambda: bool(driver.find_elements(By.ID, "who")), 30)
        who = driver.find_elements(By.ID, "who")
        assert who and who[0].text.startswith(name), driver.page_source[:2000]

    try:
        login(ADMIN)
        driver.save_screenshot(str(shots / "01-studies-admin.png"))
        link = driver.find_element(By.LINK_TEXT, service.study_uid)
        link.click()
        assert driver.find_element(By.ID, "study-uid").text == service.study_uid
        assert "PACS@127.0.0.1" in driver.find_element(By.ID, "outputs").text
        driver.save_screenshot(str(shots / "02-study-page.png"))
        heatmap = driver.find_element(By.CLASS_NAME, "heatmap-link").get_attribute("href")
        assert heatmap
        driver.get(heatmap)
        size = driver.execute_script(
            "const i = document.images[0]; return [i.naturalWidth, i.naturalHeight];"
        )
        assert size[0] > 64 and size[1] > 64  # the SC rendered as a PNG
        driver.save_screenshot(str(shots / "03-heatmap.png"))
        driver.get(service.base + "/deliveries?state=dead")
        boxes = driver.find_elements(By.CLASS_NAME, "retry-box")
        assert boxes, "no dead letter listed"
        boxes[0].click()
        driver.save_screenshot(str(shots / "04-dead-letters-admin.png"))
        driver.find_element(By.ID, "retry-button").click()
        assert wait_for(lambda: bool(driver.find_elements(By.ID, "message")), 30)
        assert "re-queued 1" in driver.find_element(By.ID, "message").text
        driver.save_screenshot(str(shots / "05-retried-admin.png"))

        login(VIEWER)

        def dead_listed() -> bool:  # the retried letter dies again (its destination is down)
            driver.get(service.base + "/deliveries?state=dead")
            return bool(driver.find_elements(By.CLASS_NAME, "retry-box"))

        assert wait_for(dead_listed, 60, 1)
        driver.find_elements(By.CLASS_NAME, "retry-box")[0].click()
        driver.find_element(By.ID, "retry-button").click()
        assert wait_for(lambda: bool(driver.find_elements(By.ID, "refused")), 30)
        assert "only admins" in driver.find_element(By.ID, "refused").text
        driver.save_screenshot(str(shots / "06-refused-viewer.png"))
    finally:
        driver.quit()
    print(f"screenshots in {shots}: {sorted(p.name for p in shots.glob('*.png'))}")
    audit = requests.get(service.base + "/audit", timeout=10, allow_redirects=False)
    assert audit.status_code == 303  # the audit log needs a login too
