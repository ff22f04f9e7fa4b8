"""Sketches that score IDs in a stream: the HotSketch of CAFE."""

from compemb.sketch.hotsketch import HotSketch
from compemb.sketch.packed import PackedSketches

__all__ = ["HotSketch", "PackedSketches"]
