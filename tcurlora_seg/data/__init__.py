"""Data: layouts on disk -> cases, the paper's MONAI transforms, datasets/loaders, the integrity check, the embedded demo.

Submodules (imported on use, so that ``import tcurlora_seg.data`` stays cheap):
``layouts.load_cases``, ``transforms.build_transforms``, ``datasets.build_dataset`` / ``build_loader``,
``check.check_dataset`` / ``run_check`` / ``main``, ``splits.write_split``, ``demo.build_demo``.
"""

from __future__ import annotations

__all__ = ["layouts", "splits", "transforms", "datasets", "check", "demo"]
