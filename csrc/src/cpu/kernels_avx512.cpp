// Fused CPU kernels compiled for avx512 (flags set in CMakeLists.txt).
#define QAENGINE_VW 16
#define QAENGINE_ACC 24
#define QAENGINE_ISA Isa::Avx512
#define QAENGINE_NAME "avx512"
#define QAENGINE_TABLE kernels_avx512
#include "kernels_impl.h"
#include "quant_impl.h"
