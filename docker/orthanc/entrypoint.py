#!/usr/bin/env python3
"""Write Orthanc's configuration from the environment and start Orthanc.

Why a generated file: Debian's Orthanc reads JSON files only, and the credentials must
come from the environment (.env), never from the repository or the image.

  ORTHANC_USERNAME, ORTHANC_PASSWORD   HTTP basic auth (required; authentication is on)
  ORTHANC_AET (ORTHANC)  ORTHANC_DICOM_PORT (4242)  ORTHANC_HTTP_PORT (8042)
  ORTHANC_NAME (test-pacs)  ORTHANC_STORAGE_DIR (/var/lib/orthanc/db)
  ORTHANC_DICOM_MODALITIES   JSON object of Orthanc DicomModalities ({} by default)
  ORTHANC_ALWAYS_ALLOW_STORE (false): accept C-STORE from AEs not in the modalities
  ORTHANC_REMOTE_ACCESS_ALLOWED (true): false answers HTTP from loopback only
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"orthanc-entrypoint: {name} is not set (see .env.example)")
    return value


def main() -> None:
    storage = os.environ.get("ORTHANC_STORAGE_DIR", "/var/lib/orthanc/db")
    config = {
        "Name": os.environ.get("ORTHANC_NAME", "test-pacs"),
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "HttpPort": int(os.environ.get("ORTHANC_HTTP_PORT", "8042")),
        "DicomPort": int(os.environ.get("ORTHANC_DICOM_PORT", "4242")),
        "DicomAet": os.environ.get("ORTHANC_AET", "ORTHANC"),
        # false: HTTP answers loopback clients only (host networking)
        "RemoteAccessAllowed": os.environ.get("ORTHANC_REMOTE_ACCESS_ALLOWED", "true") == "true",
        "AuthenticationEnabled": True,
        "RegisteredUsers": {required("ORTHANC_USERNAME"): required("ORTHANC_PASSWORD")},
        "DicomModalities": json.loads(os.environ.get("ORTHANC_DICOM_MODALITIES") or "{}"),
        "DicomAlwaysAllowStore": os.environ.get("ORTHANC_ALWAYS_ALLOW_STORE", "false") == "true",
        "DicomCheckCalledAet": True,
        "StableAge": 5,
        "ConcurrentJobs": 2,
    }
    fd, path = tempfile.mkstemp(prefix="orthanc.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh)
    orthanc = os.environ.get("ORTHANC_BINARY", "/usr/sbin/Orthanc")
    os.execv(orthanc, ["Orthanc", path])


if __name__ == "__main__":
    main()
