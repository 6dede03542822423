// What the CUDA launchers share: how a launch reports failure.
#pragma once
#include <cuda_runtime.h>

#include "common/kd_common.h"

namespace kdfast {

// The status of the launches just made. The error itself is left pending (peeked, not
// cleared) so that the binding can name it (bind_cuda.cpp's check_launch clears it).
inline int launch_status() { return cudaPeekAtLastError() == cudaSuccess ? kOk : kLaunchFailed; }

}  // namespace kdfast
