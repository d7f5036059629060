"""The HTTP service: /healthz, /metrics, the web console and its JSON API (a reader of the
database; actions go through the same functions as the CLI, audited)."""
