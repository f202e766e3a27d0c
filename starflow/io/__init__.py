"""Files: atomic writes and model folders (hub), image conversion and grids (images)."""
