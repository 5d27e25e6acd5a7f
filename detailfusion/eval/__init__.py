"""Evaluation: CIRR / FashionIQ protocol metrics, test-server submissions, baselines, plots, reports."""
