#include "status.h"

namespace kvslim {

const char* errorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::Ok: return "OK";
    case ErrorCode::Shape: return "ERR_SHAPE";
    case ErrorCode::Dtype: return "ERR_DTYPE";
    case ErrorCode::Option: return "ERR_OPTION";
    case ErrorCode::Disposed: return "ERR_DISPOSED";
    case ErrorCode::BackendUnavailable: return "ERR_BACKEND_UNAVAILABLE";
    case ErrorCode::Corrupt: return "ERR_CORRUPT";
    case ErrorCode::Busy: return "ERR_BUSY";
    case ErrorCode::Value: return "ERR_VALUE";
    case ErrorCode::OutOfMemory: return "ERR_OUT_OF_MEMORY";
    case ErrorCode::Internal: return "ERR_INTERNAL";
  }
  return "ERR_INTERNAL";
}

}  // namespace kvslim
