"""Bundled example studies for ``screener demo`` (see catalogue.json and NOTICE)."""
