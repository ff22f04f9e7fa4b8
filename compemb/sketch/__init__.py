"""Sketches that score IDs in a stream: the HotSketch of CAFE."""

from compemb.sketch.hotsketch import HotSketch

__all__ = ["HotSketch"]
