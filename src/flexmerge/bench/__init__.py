"""Offline benchmark suites: real data sets, fine-tuning, evaluators (the `text8` suite)."""
