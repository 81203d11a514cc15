"""Triton kernels behind the ``kronc::`` ops, one file per kernel (kernel, thin wrapper, autotune configs).

Imported lazily by the ops (only when a Triton path is taken), so importing kronc does not build
kernels. Under ``TRITON_INTERPRET=1`` (set before the first import) they run on CPU tensors.
"""
