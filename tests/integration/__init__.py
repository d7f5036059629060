"""Tests against real peers: PostgreSQL, Redis, Orthanc, dcmtk, services, a browser, docker."""
