"""Helpers shared by the tests (imported as ``tests.helpers.<module>``; pytest runs with ``pythonpath=["."]``)."""
