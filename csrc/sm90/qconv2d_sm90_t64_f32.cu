// One CUTLASS kernel of hybridops._C_sm90 per file, so that ninja compiles them in parallel.
#include "qconv2d_sm90.cuh"

template hybridops::sm90::LaunchResult hybridops::sm90::run_hybrid_conv<64, hybridops::sm90::OutKind::kF32>(
    const HybridConvArgs&, const std::function<void*(size_t)>&, cudaStream_t);
