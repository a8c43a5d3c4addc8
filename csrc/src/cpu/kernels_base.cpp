// Fused CPU kernels compiled for base (flags set in CMakeLists.txt).
#define QAENGINE_VW 4
#define QAENGINE_ACC 8
#define QAENGINE_ISA Isa::Base
#define QAENGINE_NAME "base"
#define QAENGINE_TABLE kernels_base
#include "kernels_impl.h"
#include "quant_impl.h"
