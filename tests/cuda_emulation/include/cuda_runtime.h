// CUDA emulation (tests/cuda_emulation): stands in for the CUDA runtime header.
#pragma once
#include "cuda_emu_runtime.h"
