// Input checks shared by the C++ op implementations (the Python API validates first; these guard
// direct torch.ops.r1kernels.* callers).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#define R1K_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define R1K_CHECK_CONTIGUOUS(x) R1K_CHECK((x).is_contiguous(), #x " must be contiguous")
#define R1K_CHECK_DTYPE(x, dt) R1K_CHECK((x).scalar_type() == (dt), #x " must be " #dt ", got ", (x).scalar_type())
#define R1K_CHECK_CPU(x) R1K_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define R1K_CHECK_CUDA(x) R1K_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor")
