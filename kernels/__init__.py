"""Kernel launchers (installed as ``hybridops.kernels``), one module per backend family.

* Triton: :mod:`.quantize` (``fake_quantize``, ``quantize_activate``) and :mod:`.qconv`
  (``qconv2d``; ``fused_hybrid_conv2d`` and ``fuse_pruned_branch``, the optional fused pruned
  branch), its tile table :mod:`.tiles`, :mod:`.attention` (``quantized_attention_finite``, the
  flash-style quantized attention), and the jitted helpers they share in :mod:`._common`;
* oneDNN (the CPU's int8 units through PyTorch's bundled oneDNN): :mod:`.onednn`, and
  :mod:`.onednn_attention` (``quantized_attention_finite`` on ``torch._int_mm``);
* shared by every backend and by the op layer, pure PyTorch: the storage format :mod:`.packing`,
  the conv geometry :mod:`.geometry` and the one cache of derived tensors :mod:`.derived`.

Each launcher takes exactly the positional arguments of the function of the same name in
:mod:`hybridops.ops.reference` and returns the same thing; the ``hybridops::`` custom ops call
them after validating the arguments (the registry in :mod:`hybridops.ops.registry` says which
module serves which backend). This package imports no module of its own at import time, so one
backend's dependency (Triton) is never needed by another, and nothing from the package above it
(docs/design.md, section 2).
"""
