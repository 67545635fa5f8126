"""Collectors that read an exporter through the tunnel and export what it gets wrong, corrected.

Each collector has `poll()` (run periodically on the prober's worker pool; bounded by timeouts, never
blocks a scrape) and `collect()` (yields prometheus_client metric families from the last poll).
"""
from .celery_workers import CeleryWorkersCollector

__all__ = ["CeleryWorkersCollector"]
