// What the CUDA side reports to backends(): whether it was compiled in and whether a GPU answers.
#pragma once
#include <cstddef>
#include <string>

namespace kvslim {

struct CudaInfo {
  bool built = false;      // compiled with nvcc
  bool available = false;  // a driver and at least one device answered
  std::string reason;      // why not available
  int devices = 0;
  std::string name;        // device 0
  int computeMajor = 0, computeMinor = 0;
  size_t memoryBytes = 0;
  int runtimeVersion = 0, driverVersion = 0;
  std::string architectures;  // the sm_XX list compiled in
};

// Implemented by native/cuda/cuda_device.cc, or by native/cuda/cuda_stub.cc without nvcc.
CudaInfo cudaInfo();

}  // namespace kvslim
