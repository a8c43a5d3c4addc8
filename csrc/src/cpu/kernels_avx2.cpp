// Fused CPU kernels compiled for avx2 (flags set in CMakeLists.txt).
#define QAENGINE_VW 8
#define QAENGINE_ACC 8
#define QAENGINE_ISA Isa::Avx2
#define QAENGINE_NAME "avx2"
#define QAENGINE_TABLE kernels_avx2
#include "kernels_impl.h"
#include "quant_impl.h"
