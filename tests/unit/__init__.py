"""Fast in-process tests (the fast lane: pytest -m "not integration")."""
