"""UNETR construction, pretrained-weight loading and checkpoint files."""

from __future__ import annotations

from tcurlora_seg.models.checkpoint import load_checkpoint, save_checkpoint
from tcurlora_seg.models.unetr import LoadReport, build_unetr, load_pretrained

__all__ = ["LoadReport", "build_unetr", "load_checkpoint", "load_pretrained", "save_checkpoint"]
