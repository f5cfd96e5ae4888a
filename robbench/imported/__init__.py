"""Models robbench did not train: the user's own (``robbench add``, ``robbench.evaluate(model)``) and the
papers' released checkpoints (``robbench convert``), written as *imported* runs."""
from robbench.imported.record import ORIGIN_IMPORTED, ORIGIN_TRAINED, origin_of, verify_imported_source

__all__ = ["ORIGIN_IMPORTED", "ORIGIN_TRAINED", "origin_of", "verify_imported_source"]
