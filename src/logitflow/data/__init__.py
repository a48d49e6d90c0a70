"""Datasets: reading, validation, splitting, tokenisation and the offline demo data."""
