"""Offline evaluation: scoring, metrics, source training, splits, frame cache, live demo."""
