"""CUDA kernels (`*.cu`) and their build (`build.py`). Kernels know no model: the torch ops that call
them live in `slimc.runtime.sparse24_ops`."""
