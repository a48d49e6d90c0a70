"""Diagnostics that explain results (not pipeline stages)."""
