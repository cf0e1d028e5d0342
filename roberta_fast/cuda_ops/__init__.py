"""Python side of the CUDA C++ backend: one module per op (same name as kernels/<op>.py), each with
the same host-function signatures as the Triton file, calling into the compiled roberta_fast._C with
device pointers, sizes, strides and the current CUDA stream."""
