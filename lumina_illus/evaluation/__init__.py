"""Evaluation: character recall vs samples seen, colour statistics, denoising spectra, dashboards."""
