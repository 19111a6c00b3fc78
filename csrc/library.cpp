// The lora_kernels operator library: the schemas (op_schemas.h), defined once,
// here, by the compiled extension lora_kernels._C. The kernels of each op are
// registered in the files named after it (see op_schemas.h); Python adds the
// fake kernels (lora_kernels/ops.py), the ops that run once per
// train()/eval() switch (merge_, unmerge_, merged_weight) and a fallback
// kernel for devices without a C++ one (the Triton and reference backends).
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(lora_kernels, m) { lora_kernels::define_ops(m); }
