from __future__ import annotations

from pathlib import Path

import pytest

from data_helpers import make_official


@pytest.fixture
def official_root(tmp_path: Path) -> Path:
    return make_official(tmp_path / "ds", 6, {"train": [1, 2], "val": [3], "test": [4, 5, 6]})
