"""Radius tables, router training and the dual-smoothing composition engine."""
