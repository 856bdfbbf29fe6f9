// Portable build of the row kernels (at::vec's generic Vectorized): the fallback on any CPU.
#define CPU_CAPABILITY DEFAULT

#include "ppo_loss_kernels.h"
