"""``@triton.jit`` kernels only. Never import these modules directly from user code: the host wrappers
(``semblend_core.triton_kernels``, ``semblend_core.partial_attention``) validate inputs, pick grids, fall back to
the torch ``*_reference`` twins on CPU, and are the only entry points. Needs the ``gpu`` extra (torch, triton)."""
