// Linked instead of the CUDA backend when the addon is built without nvcc (KVSLIM_CUDA=off or
// no CUDA toolkit): CUDA is reported as not built, and asking for it is a coded error.
#include "../core/backend.h"
#include "../core/cuda_info.h"

namespace kvslim {

CudaInfo cudaInfo() {
  CudaInfo info;
  info.reason = "this build of kvslim has no CUDA backend (built without nvcc or with KVSLIM_CUDA=off)";
  return info;
}

std::shared_ptr<Backend> cudaBackend(Status* whyUnavailable) {
  *whyUnavailable = Status(ErrorCode::BackendUnavailable, cudaInfo().reason);
  return nullptr;
}

}  // namespace kvslim
