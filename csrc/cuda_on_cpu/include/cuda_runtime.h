// Stands in for the CUDA header of this name when fastdiff's kernels are compiled for the CPU.
#pragma once
#include "../cuda_on_cpu.h"
