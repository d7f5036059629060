#!/usr/bin/env python3
"""Health check: Orthanc's REST API answers /system with the configured credentials."""

import base64
import os
import sys
import urllib.request

port = os.environ.get("ORTHANC_HTTP_PORT", "8042")
token = f"{os.environ.get('ORTHANC_USERNAME', '')}:{os.environ.get('ORTHANC_PASSWORD', '')}"
request = urllib.request.Request(
    f"http://127.0.0.1:{port}/system",
    headers={"Authorization": "Basic " + base64.b64encode(token.encode()).decode()},
)
try:
    with urllib.request.urlopen(request, timeout=8) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"orthanc not healthy: {exc}", file=sys.stderr)
    sys.exit(1)
