"""Fused ops: one package per op (``mix_add_layernorm``, ``noisy_attention``, ``random_noise``).

Each package documents its op's semantics once, in its ``__init__``, and holds the op's
``torch.library`` registration (schema, fake, autograd), its launchers and its ``{backend: launcher}``
table (``LAUNCHERS``), which :mod:`noisynn_kernels.functional`, the modules and the model integration
all dispatch through.  Launchers take arguments already checked by :mod:`noisynn_kernels._validate`
and add only their backend's own limits.  Triton is imported only when a ``triton`` launcher first
runs; importing a backend module registers its ops in the ``noisynn::`` namespace.
"""
