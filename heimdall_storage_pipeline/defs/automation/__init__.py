"""Schedules, sensors, asset checks and the event-driven cleanup (replacing Celery Beat)."""
