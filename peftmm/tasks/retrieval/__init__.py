"""Cross-modal retrieval (task.py) and the training pairs it can score through (memory.py)."""

from .task import RECALL_AT, RetrievalTask, Temperature, recall_metrics, split_embeddings

__all__ = ["RECALL_AT", "RetrievalTask", "Temperature", "recall_metrics", "split_embeddings"]
