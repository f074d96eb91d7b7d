"""Task types: reader + label space + head + decoder. Importing this registers the built-ins."""

from blurbtune.tasks import doc_classification, qa, relation, similarity, tagging  # noqa: F401
from blurbtune.tasks.base import TYPES, Rows, TaskType, task_type

__all__ = ["TYPES", "Rows", "TaskType", "task_type"]
