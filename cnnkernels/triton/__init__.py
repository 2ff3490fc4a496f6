"""Triton kernels, one file per op. Importing a submodule imports triton: set TRITON_INTERPRET=1
before that to run the kernels on CPU tensors through the interpreter."""
