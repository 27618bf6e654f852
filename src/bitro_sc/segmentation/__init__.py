"""Segmentation backends behind `bs.tl.segment` (a registry)."""
