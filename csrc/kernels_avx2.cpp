// AVX2 build of the row kernels. setup.py compiles files named *_avx2.cpp with -mavx2 -mfma -mf16c;
// ppo_loss.cpp runs it only when ATen reports the AVX2 capability.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "ppo_loss_kernels.h"
