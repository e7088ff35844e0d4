"""Imports every built-in reward module so that its ``@register_reward`` runs.

The registry imports this module lazily on first lookup. Each module below imports only
light dependencies at import time; models load on first use.
"""
from __future__ import annotations

from . import aesthetic, clipscore, hps, imagereward, jpeg, ocr, pickscore, remote  # noqa: F401
