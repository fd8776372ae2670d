"""Triton GPU backend (DESIGN §4): masked LoRA linear and linear saliency kernels.

Import ``linear`` / ``saliency`` for the launchers (signatures of ``backends/reference.py``);
``python -m spare_kernels.backends.triton.aot`` compiles every kernel ahead of time. Under
``TRITON_INTERPRET=1`` (set before importing the kernel modules) the launchers also run on CPU tensors.
"""
