"""Constants shared by the latency tests (the fixtures themselves live in conftest.py)."""

NETS = 10  # measured networks: the fit needs 8 (a held-out split and 5-fold CV of the rest)
