"""Synthetic clickstream and outcomes, so every number of the platform moves without real traffic."""
