"""The record that ``setup.py`` writes about the C++/CUDA extension build (``_build_info.json``)."""
from __future__ import annotations

import json
import os

BUILD_INFO_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_info.json")


def build_info() -> dict:
    """What ``setup.py`` recorded about the C++/CUDA extension build."""
    try:
        with open(BUILD_INFO_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"built": False, "reason": "no build record (package not installed with setup.py?)"}
