"""Keel tests."""
