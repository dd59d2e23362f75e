"""Fused ops: one module per op, each holding its launchers, its ``torch.library`` registration
(``triton_op`` + ``wrap_triton``), fake implementation and autograd, and the checked Python entry
point.  Importing a module registers its ops in the ``noisynn::`` namespace.
"""
