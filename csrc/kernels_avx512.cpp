// AVX-512 build of the row kernels. setup.py compiles files named *_avx512.cpp with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma; ppo_loss.cpp runs it only when ATen reports AVX512.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512

#include "ppo_loss_kernels.h"
