"""Adapters that put compemb's compressed tables into other libraries' models (each an optional extra)."""
