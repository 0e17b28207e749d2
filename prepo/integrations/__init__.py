"""Integrations of PREPO into other training frameworks (each behind its own extra)."""
