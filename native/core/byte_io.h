// Little-endian flat bytes for save()/load() of policy and index state: a writer that appends
// plain values and counted arrays, and a reader that never reads past its buffer (every get
// reports whether the bytes were there, so a truncated or damaged state is refused, not read).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvslim {

// Reserves `bytes` in *out (empty) and, for a large reservation on Linux, asks for transparent
// huge pages: filling a save() of hundreds of MB then faults 2 MiB pages instead of 4 KiB ones
// (half the time of allocating and filling it).
inline void reserveOutput(std::vector<uint8_t>* out, size_t bytes) {
  out->reserve(bytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = (reinterpret_cast<uintptr_t>(out->data()) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<uintptr_t>(out->data()) + out->capacity()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

class ByteWriter {
 public:
  explicit ByteWriter(std::vector<uint8_t>* out) : out_(out) {}
  template <typename T>
  void put(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>, "plain values only");
    const auto* bytes = reinterpret_cast<const uint8_t*>(&value);
    out_->insert(out_->end(), bytes, bytes + sizeof(T));
  }
  // u64 count, then the elements.
  template <typename T>
  void putArray(const std::vector<T>& values) {
    putArray(values.data(), values.size());
  }
  template <typename T>
  void putArray(const T* values, size_t count) {
    static_assert(std::is_trivially_copyable_v<T>, "plain values only");
    put(uint64_t(count));
    const auto* bytes = reinterpret_cast<const uint8_t*>(values);
    out_->insert(out_->end(), bytes, bytes + count * sizeof(T));
  }

 private:
  std::vector<uint8_t>* out_;
};

class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  template <typename T>
  bool get(T* value) {
    static_assert(std::is_trivially_copyable_v<T>, "plain values only");
    if (size_ - offset_ < sizeof(T)) return false;
    std::memcpy(value, data_ + offset_, sizeof(T));
    offset_ += sizeof(T);
    return true;
  }
  // A putArray() array of exactly `count` elements (the caller knows how many the state must hold:
  // a count read from the bytes alone could ask for any allocation).
  template <typename T>
  bool getArray(std::vector<T>* values, uint64_t count) {
    uint64_t stored = 0;
    if (!get(&stored) || stored != count || (size_ - offset_) / sizeof(T) < count) return false;
    values->resize(size_t(count));
    std::memcpy(values->data(), data_ + offset_, size_t(count) * sizeof(T));
    offset_ += size_t(count) * sizeof(T);
    return true;
  }
  // A putArray() array of at most `limit` elements.
  template <typename T>
  bool getArrayUpTo(std::vector<T>* values, uint64_t limit) {
    uint64_t stored = 0;
    const size_t at = offset_;
    if (!get(&stored) || stored > limit) return false;
    offset_ = at;
    return getArray(values, stored);
  }
  // Moves past bytes the caller read itself (it checked they exist).
  void skip(size_t bytes) { offset_ += bytes; }
  bool done() const { return offset_ == size_; }
  size_t offset() const { return offset_; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t offset_ = 0;
};

}  // namespace kvslim
