"""Slides → HDF5 bags: open, segment tissue, tile at a target resolution, encode, write."""
