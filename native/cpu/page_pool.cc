#include "page_pool.h"

#include <algorithm>

#include "huge_memory.h"

namespace kvslim::cpu {

PagePool::~PagePool() {
  for (auto& [base, slab] : slabs_) unmapHuge(base, slab.mappedBytes);
}

bool PagePool::addSlab(size_t blockBytes) {
  const size_t slabBytes = std::max(kSlabBytes, blockBytes);
  size_t mapped = 0;
  char* base = mapHuge(slabBytes, &mapped);
  if (base == nullptr) return false;
  Slab slab;
  slab.blockBytes = blockBytes;
  slab.blocks = mapped / blockBytes;
  slab.mappedBytes = mapped;
  slabs_.emplace(base, slab);
  std::set<char*>& blocks = freeBlocks_[blockBytes];
  for (size_t i = 0; i < slab.blocks; ++i) blocks.insert(blocks.end(), base + i * blockBytes);
  freeBytes_ += slab.blocks * blockBytes;
  return true;
}

void* PagePool::allocate(size_t bytes) {
  const size_t blockBytes = bytes == 0 ? 64 : (bytes + 63) / 64 * 64;
  std::lock_guard<std::mutex> lock(mutex_);
  std::set<char*>& blocks = freeBlocks_[blockBytes];
  if (blocks.empty() && !addSlab(blockBytes)) return nullptr;
  char* block = *blocks.begin();
  blocks.erase(blocks.begin());
  freeBytes_ -= blockBytes;
  auto slab = std::prev(slabs_.upper_bound(block));
  slab->second.used++;
  return block;
}

void PagePool::release(void* block) {
  if (block == nullptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = std::prev(slabs_.upper_bound(static_cast<char*>(block)));
  Slab& slab = found->second;
  freeBlocks_[slab.blockBytes].insert(static_cast<char*>(block));
  freeBytes_ += slab.blockBytes;
  if (--slab.used > 0 || freeBytes_ <= kKeepFreeBytes) return;
  // An idle slab while much memory is idle: unmap it.
  unmapSlab(found);
}

std::map<char*, PagePool::Slab>::iterator PagePool::unmapSlab(std::map<char*, Slab>::iterator found) {
  const Slab& slab = found->second;
  char* base = found->first;
  char* end = base + slab.blocks * slab.blockBytes;
  std::set<char*>& blocks = freeBlocks_[slab.blockBytes];
  blocks.erase(blocks.lower_bound(base), blocks.lower_bound(end));
  freeBytes_ -= slab.blocks * slab.blockBytes;
  unmapHuge(base, slab.mappedBytes);
  return slabs_.erase(found);
}

size_t PagePool::mappedBytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t total = 0;
  for (const auto& [base, slab] : slabs_) total += slab.mappedBytes;
  return total;
}

size_t PagePool::idleBytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return freeBytes_;
}

size_t PagePool::releaseIdle() {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t released = 0;
  for (auto it = slabs_.begin(); it != slabs_.end();) {
    if (it->second.used > 0) {
      ++it;
      continue;
    }
    released += it->second.mappedBytes;
    it = unmapSlab(it);
  }
  return released;
}

}  // namespace kvslim::cpu
