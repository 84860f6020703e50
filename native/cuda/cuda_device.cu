// What backends() reports about CUDA. The runtime is linked statically, so on a machine without
// a driver or a GPU the first runtime call fails with a readable error instead of the addon
// failing to load; that error becomes the reason CUDA is unavailable.
#include <cuda_runtime.h>

#include <string>

#include "../core/cuda_info.h"

#ifndef KVSLIM_CUDA_ARCHS
#error "KVSLIM_CUDA_ARCHS (the compiled sm_XX list, e.g. \"80,86,89,90\") must be defined by the build"
#endif

namespace kvslim {

namespace {

// Exists only to ask the runtime whether this build holds code the device can run.
__global__ void kernelImageProbe() {}

CudaInfo queryCudaInfo() {
  CudaInfo info;
  info.built = true;
  info.architectures = KVSLIM_CUDA_ARCHS;
  // Both succeed without a driver: the runtime knows its own version, and the driver version reads 0.
  if (cudaRuntimeGetVersion(&info.runtimeVersion) != cudaSuccess) info.runtimeVersion = 0;
  if (cudaDriverGetVersion(&info.driverVersion) != cudaSuccess) info.driverVersion = 0;
  cudaError_t error = cudaGetDeviceCount(&info.devices);
  if (error != cudaSuccess) {
    info.devices = 0;
    info.reason = cudaGetErrorString(error);
    cudaGetLastError();  // the failure is reported here; later calls must not see it as theirs
    return info;
  }
  if (info.devices == 0) {
    info.reason = "no CUDA device found";
    return info;
  }
  cudaDeviceProp properties;
  error = cudaGetDeviceProperties(&properties, 0);
  if (error != cudaSuccess) {
    info.reason = std::string("device 0 did not answer: ") + cudaGetErrorString(error);
    cudaGetLastError();
    return info;
  }
  info.name = properties.name;
  info.computeMajor = properties.major;
  info.computeMinor = properties.minor;
  info.memoryBytes = properties.totalGlobalMem;
  // A GPU older than every compiled architecture (and than the PTX kept for newer ones) would
  // fail each launch; report it here so device 'auto' falls back to the CPU.
  cudaFuncAttributes attributes;
  error = cudaFuncGetAttributes(&attributes, kernelImageProbe);
  if (error != cudaSuccess) {
    info.reason = std::string("device 0 (") + properties.name + ", compute capability " +
                  std::to_string(properties.major) + "." + std::to_string(properties.minor) +
                  ") cannot run this build's kernels (sm_" + KVSLIM_CUDA_ARCHS + "): " + cudaGetErrorString(error);
    cudaGetLastError();
    return info;
  }
  info.available = true;
  return info;
}

}  // namespace

CudaInfo cudaInfo() {
  // Asked once: driver initialization is slow, and the answer does not change in a process.
  static const CudaInfo info = queryCudaInfo();
  return info;
}

}  // namespace kvslim
