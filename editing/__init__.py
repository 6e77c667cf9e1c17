"""kvedit's model-side core: adapters, keys, values, statistics, routers and the routed layer.

This package imports none of kvedit's service packages (store, cluster, workers, serving).
"""

from editing.editor import ComputedEdits, EditConfig, Editor
from editing.records import EditRecordError, EditRequest, load_records
from editing.routed import RoutedFFN
from editing.table import MemoryMismatchError, MemorySpec

__all__ = [
    "ComputedEdits", "EditConfig", "Editor", "EditRecordError", "EditRequest", "load_records",
    "RoutedFFN", "MemoryMismatchError", "MemorySpec",
]
