"""Training recipes of the screener's models (torch, CPU, seeded). Not used at run time."""
