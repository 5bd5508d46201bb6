"""Search methods over one shared machinery."""
