"""Training and evaluation engine: metrics with an explicit empty-mask policy, post-processing."""

from __future__ import annotations

from tcurlora_seg.engine.metrics import case_metrics, markdown_table, summarize, write_metrics_csv
from tcurlora_seg.engine.postprocess import remove_small_components

__all__ = ["case_metrics", "markdown_table", "remove_small_components", "summarize", "write_metrics_csv"]
