// Status values cross every layer boundary below native/napi; only napi turns them into JS errors.
#pragma once
#include <string>
#include <utility>

namespace kvslim {

enum class ErrorCode {
  Ok = 0,
  Shape,               // ERR_SHAPE: wrong tensor length or dimension
  Dtype,               // ERR_DTYPE: wrong element type
  Option,              // ERR_OPTION: bad option value
  Disposed,            // ERR_DISPOSED: object used after dispose()
  BackendUnavailable,  // ERR_BACKEND_UNAVAILABLE: e.g. CUDA asked for but absent
  Corrupt,             // ERR_CORRUPT: malformed serialized data
  Busy,                // ERR_BUSY: a call arrived while another one runs on the same object
  Value,               // ERR_VALUE: NaN or infinity inside a tensor
  OutOfMemory,         // ERR_OUT_OF_MEMORY
  Internal,            // ERR_INTERNAL: a bug in kvslim
};

const char* errorCodeName(ErrorCode code);

class Status {
 public:
  Status() = default;
  Status(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status ok() { return {}; }
  bool isOk() const { return code_ == ErrorCode::Ok; }
  ErrorCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  ErrorCode code_ = ErrorCode::Ok;
  std::string message_;
};

#define KVSLIM_RETURN_IF_ERROR(expr)      \
  do {                                    \
    ::kvslim::Status status_ = (expr);    \
    if (!status_.isOk()) return status_;  \
  } while (0)

}  // namespace kvslim
