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
  // An idle slab while much memory is idle: unmap it and forget its blocks.
  char* base = found->first;
  char* end = base + slab.blocks * slab.blockBytes;
  std::set<char*>& blocks = freeBlocks_[slab.blockBytes];
  blocks.erase(blocks.lower_bound(base), blocks.lower_bound(end));
  freeBytes_ -= slab.blocks * slab.blockBytes;
  unmapHuge(base, slab.mappedBytes);
  slabs_.erase(found);
}

}  // namespace kvslim::cpu
