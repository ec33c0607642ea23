"""Prefect flows, one per pipeline stage (``python -m flows.<stage>``), plus ``pipeline``.

Thin shells over ``poison.stages``: Prefect adds run tracking, logs and artifacts.
"""

import os

# Offline machines: no telemetry (also set in prefect.toml for runs from the repo root).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "poison")
