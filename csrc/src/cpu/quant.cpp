// ISA selection of the quantization / epilogue kernels (quant.h); the bodies are in quant_impl.h, compiled with the
// fused kernels in kernels_{base,avx2,avx512}.cpp.
#include "quant.h"

#include <vector>

namespace qaengine::cpu {

#if !defined(QAENGINE_X86_KERNELS)
const QuantKernels& quant_kernels_avx2() {
  return quant_kernels_base();
}
const QuantKernels& quant_kernels_avx512() {
  return quant_kernels_base();
}
#endif

const QuantKernels& best_quant_kernels() {
  static const QuantKernels& best = cpu_supports(Isa::Avx512) ? quant_kernels_avx512()
                                    : cpu_supports(Isa::Avx2) ? quant_kernels_avx2()
                                                              : quant_kernels_base();
  return best;
}

std::vector<const QuantKernels*> available_quant_kernels() {
  std::vector<const QuantKernels*> out{&quant_kernels_base()};
  if (cpu_supports(Isa::Avx2)) out.push_back(&quant_kernels_avx2());
  if (cpu_supports(Isa::Avx512)) out.push_back(&quant_kernels_avx512());
  return out;
}

}  // namespace qaengine::cpu
