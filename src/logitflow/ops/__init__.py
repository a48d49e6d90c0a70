"""Pure tensor math: no I/O, no params; shapes in docstrings."""
