"""What the unit and integration tests share: tiny batches, masks, training data, serving models.

Imported as `helpers.<module>` (pytest puts `tests/` on the path through `tests/conftest.py`).
"""
