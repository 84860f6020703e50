// Large host buffers backed by 2 MiB pages where the kernel allows (madvise; THP is often
// "madvise" only). A prefill streams tens of MiB of f32 keys, values and probabilities per row
// tile: on 4 KiB pages each 32-key block touches new pages, and the page walks cost a 16K-token
// prefill about 9% (paired, one thread).
#pragma once
#include <cstddef>
#include <new>
#include <utility>

namespace kvslim::cpu {

// An anonymous mapping of `bytes` rounded up to 2 MiB, 2 MiB aligned, with the huge-page hint;
// nullptr when the mapping fails. *mappedBytes receives what to pass to unmapHuge.
char* mapHuge(size_t bytes, size_t* mappedBytes);
void unmapHuge(void* base, size_t mappedBytes);

// Uninitialised elements of a trivial type T in such a mapping; grow-only (a larger reserve
// keeps nothing).
template <class T>
class HugeArray {
 public:
  HugeArray() = default;
  HugeArray(const HugeArray&) = delete;
  HugeArray& operator=(const HugeArray&) = delete;
  HugeArray(HugeArray&& other) noexcept { *this = std::move(other); }
  HugeArray& operator=(HugeArray&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      capacity_ = std::exchange(other.capacity_, 0);
      mappedBytes_ = std::exchange(other.mappedBytes_, 0);
    }
    return *this;
  }
  ~HugeArray() { release(); }

  // Room for `count` elements; throws std::bad_alloc when the mapping fails.
  void reserve(size_t count) {
    if (count <= capacity_) return;
    release();
    size_t mapped = 0;
    char* base = mapHuge(count * sizeof(T), &mapped);
    if (base == nullptr) throw std::bad_alloc();
    data_ = reinterpret_cast<T*>(base);
    capacity_ = mapped / sizeof(T);
    mappedBytes_ = mapped;
  }
  void release() {
    unmapHuge(data_, mappedBytes_);
    data_ = nullptr;
    capacity_ = 0;
    mappedBytes_ = 0;
  }
  T* data() const { return data_; }
  size_t mappedBytes() const { return mappedBytes_; }

 private:
  T* data_ = nullptr;
  size_t capacity_ = 0;
  size_t mappedBytes_ = 0;
};

}  // namespace kvslim::cpu
