"""Kernel launchers (installed as ``hybridops.kernels``), one module per backend family.

* Triton: :mod:`.quantize` (``fake_quantize``, ``quantize_activate``) and :mod:`.qconv`
  (``qconv2d``; ``fused_hybrid_conv2d`` and ``fuse_pruned_branch``, the optional fused pruned
  branch), its tile table :mod:`.tiles`, and the jitted helpers they share in :mod:`._common`;
* oneDNN (the CPU's int8 units through PyTorch's bundled oneDNN): :mod:`.onednn`.

Each launcher takes exactly the positional arguments of the function of the same name in
:mod:`hybridops.ops.reference` and returns the same thing; the ``hybridops::`` custom ops call
them after validating the arguments (the registry in :mod:`hybridops.ops.backends` says which
module serves which backend). This package imports no module of its own at import time, so one
backend's dependency (Triton) is never needed by another. Kernels import only the leaf modules
:mod:`hybridops.kernels.packing` and :mod:`hybridops.kernels.geometry` from above.
"""
