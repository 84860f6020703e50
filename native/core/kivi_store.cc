#include "kivi_store.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "dtype.h"
#include "kivi_quant.h"

namespace kvslim {

KiviStore::KiviStore(std::shared_ptr<Backend> backend, const KiviStoreShape& shape)
    : backend_(std::move(backend)),
      shape_(shape),
      heads_(size_t(shape.layers) * size_t(shape.kvHeads)),
      layerTokens_(size_t(shape.layers), 0) {
  for (HeadState& state : heads_) state.values.ring = true;
}

Status KiviStore::newPage(size_t bytes, std::shared_ptr<Page>* out) {
  void* memory = backend_->allocate(bytes);
  if (memory == nullptr) {
    return Status(ErrorCode::OutOfMemory, "could not allocate a KIVI page of " + std::to_string(bytes) + " bytes on " +
                                              backend_->name());
  }
  *out = std::make_shared<Page>(backend_, memory);
  return Status::ok();
}

const uint16_t* KiviStore::hostRow(const Residual& residual, int64_t i) const {
  const int64_t row = (residual.start + i) % residual.capacity;
  return residual.host->data() + size_t(row) * size_t(shape_.format.headDim);
}

// A fresh buffer of max(needed, base) rows holding the current rows in order from row 0.
Status KiviStore::reserve(Residual* residual, int64_t extra) {
  const int64_t needed = residual->count + extra;
  const bool shared = residual->device != nullptr && (residual->device.use_count() > 1 || residual->host.use_count() > 1);
  if (residual->device != nullptr && needed <= residual->capacity && !shared) return Status::ok();
  // The value ring holds R + 1 rows during a decode step (the step's own value before the flush).
  const int64_t base = residual->ring ? shape_.residual + 1 : shape_.residual;
  const int64_t capacity = std::max(needed, base);
  const size_t dim = size_t(shape_.format.headDim);
  std::shared_ptr<Page> device;
  KVSLIM_RETURN_IF_ERROR(newPage(size_t(capacity) * dim * 2, &device));
  auto host = std::make_shared<std::vector<uint16_t>>(size_t(capacity) * dim);
  for (int64_t i = 0; i < residual->count; ++i) {
    std::memcpy(host->data() + size_t(i) * dim, hostRow(*residual, i), dim * 2);
  }
  if (residual->count > 0) {
    KVSLIM_RETURN_IF_ERROR(backend_->upload(device->memory(), host->data(), size_t(residual->count) * dim * 2));
  }
  residual->device = std::move(device);
  residual->host = std::move(host);
  residual->capacity = capacity;
  residual->start = 0;
  return Status::ok();
}

// Writes rows after the live ones (room reserved); uploads at most two contiguous runs.
Status KiviStore::pushRows(Residual* residual, const uint16_t* rows, int64_t count) {
  const size_t dim = size_t(shape_.format.headDim);
  int64_t written = 0;
  while (written < count) {
    const int64_t position = (residual->start + residual->count + written) % residual->capacity;
    const int64_t run = std::min(count - written, residual->capacity - position);
    uint16_t* host = residual->host->data() + size_t(position) * dim;
    std::memcpy(host, rows + size_t(written) * dim, size_t(run) * dim * 2);
    uint8_t* device = static_cast<uint8_t*>(residual->device->memory()) + size_t(position) * dim * 2;
    KVSLIM_RETURN_IF_ERROR(backend_->upload(device, host, size_t(run) * dim * 2));
    written += run;
  }
  residual->count += count;
  return Status::ok();
}

// The ring advances; the key buffer moves its remaining rows to the front (once per R tokens).
Status KiviStore::dropOldest(Residual* residual, int64_t count) {
  if (count == 0) return Status::ok();
  if (residual->ring) {
    residual->start = (residual->start + count) % residual->capacity;
    residual->count -= count;
    return Status::ok();
  }
  const size_t dim = size_t(shape_.format.headDim);
  const int64_t remaining = residual->count - count;
  uint16_t* host = residual->host->data();
  std::memmove(host, host + size_t(count) * dim, size_t(remaining) * dim * 2);
  residual->count = remaining;
  if (remaining == 0) return Status::ok();
  return backend_->upload(residual->device->memory(), host, size_t(remaining) * dim * 2);
}

Status KiviStore::appendRecords(std::vector<std::shared_ptr<Page>>* pages, int64_t first, int64_t perPage,
                                size_t recordBytes, const uint8_t* records, int64_t count) {
  const size_t pageBytes = size_t(perPage) * recordBytes;
  const bool lastPageShared = !pages->empty() && pages->back().use_count() > 1;
  int64_t written = 0;
  while (written < count) {
    const int64_t slot = (first + written) % perPage;
    if (slot == 0) {
      std::shared_ptr<Page> page;
      KVSLIM_RETURN_IF_ERROR(newPage(pageBytes, &page));
      pages->push_back(std::move(page));
    } else if (written == 0 && lastPageShared) {
      // Copy-on-write: a fork still reads this page's records and will write its own tail.
      std::shared_ptr<Page> copy;
      KVSLIM_RETURN_IF_ERROR(newPage(pageBytes, &copy));
      KVSLIM_RETURN_IF_ERROR(backend_->copy(copy->memory(), pages->back()->memory(), pageBytes));
      pages->back() = std::move(copy);
    }
    const int64_t run = std::min(perPage - slot, count - written);
    uint8_t* dst = static_cast<uint8_t*>(pages->back()->memory()) + size_t(slot) * recordBytes;
    KVSLIM_RETURN_IF_ERROR(backend_->upload(dst, records + size_t(written) * recordBytes, size_t(run) * recordBytes));
    written += run;
  }
  return Status::ok();
}

// Moves the rows into a buffer of the base capacity; on failure the big buffer stays.
void KiviStore::shrink(Residual* residual) {
  const size_t dim = size_t(shape_.format.headDim);
  Residual rebuilt;
  rebuilt.ring = residual->ring;
  std::vector<uint16_t> ordered(size_t(residual->count) * dim);
  for (int64_t i = 0; i < residual->count; ++i) std::memcpy(ordered.data() + size_t(i) * dim, hostRow(*residual, i), dim * 2);
  if (reserve(&rebuilt, residual->count).isOk() && pushRows(&rebuilt, ordered.data(), residual->count).isOk()) {
    *residual = std::move(rebuilt);
  }
}

void KiviStore::refreshPointers(HeadState* state) {
  state->keyPointers.clear();
  state->valuePointers.clear();
  for (const auto& page : state->keyPages) state->keyPointers.push_back(page->memory());
  for (const auto& page : state->valuePages) state->valuePointers.push_back(page->memory());
}

int64_t KiviStore::heldRecords(const Hole& hole, int64_t quantized, int64_t perPage, int64_t total) const {
  return total - releasedPages(hole, quantized) * perPage;
}

int64_t KiviStore::heldKeyGroups(const Hole& hole, int64_t quantizedKeys) const {
  return heldRecords(hole, quantizedKeys, keyGroupsPerPage(), quantizedKeys / shape_.format.group);
}

int64_t KiviStore::heldValueTokens(const Hole& hole, int64_t quantizedValues) const {
  return heldRecords(hole, quantizedValues, shape_.pageTokens, quantizedValues);
}

void KiviStore::releaseHole(HeadState* state) const {
  // Entries of the pages released so far end at firstReleased; the newly covered pages follow.
  const int64_t first = firstReleased(state->hole);
  const auto release = [&](std::vector<std::shared_ptr<Page>>* pages, int64_t* released, int64_t quantized) {
    const int64_t more = releasedPages(state->hole, quantized) - *released;
    if (more <= 0) return;
    pages->erase(pages->begin() + first, pages->begin() + first + more);
    *released += more;
  };
  release(&state->keyPages, &state->releasedKeyPages, state->quantizedKeys);
  release(&state->valuePages, &state->releasedValuePages, state->quantizedValues);
}

Status KiviStore::setHole(int32_t layer, int32_t h, int64_t begin, int64_t end) {
  HeadState& state = head(layer, h);
  if (begin >= end) return Status::ok();
  const Hole& hole = state.hole;
  if (begin < 0 || end > layerTokens_[size_t(layer)] || (hole.size() > 0 && (begin != hole.begin || end < hole.end))) {
    return Status(ErrorCode::Internal, "a KIVI hole may only grow at its end, inside the layer's tokens (held [" +
                                           std::to_string(hole.begin) + ", " + std::to_string(hole.end) + "), asked [" +
                                           std::to_string(begin) + ", " + std::to_string(end) + "))");
  }
  state.hole = Hole{begin, end};
  releaseHole(&state);
  refreshPointers(&state);
  return Status::ok();
}

Status KiviStore::stage(int32_t layer, const HostTensor& k, const HostTensor& v, int64_t n) {
  const int32_t kvHeads = shape_.kvHeads;
  const size_t dim = size_t(shape_.format.headDim);
  // Round to f16 (the residual's precision) and check values before touching the store.
  std::vector<uint16_t> keys(size_t(n) * size_t(kvHeads) * dim), values(keys.size());
  for (int64_t t = 0; t < n; ++t) {
    for (int32_t h = 0; h < kvHeads; ++h) {
      const size_t first = (size_t(t) * size_t(kvHeads) + size_t(h)) * dim;
      const size_t staged = (size_t(h) * size_t(n) + size_t(t)) * dim;
      KVSLIM_RETURN_IF_ERROR(convertChecked(k, first, dim, keys.data() + staged, DType::F16, "k"));
      KVSLIM_RETURN_IF_ERROR(convertChecked(v, first, dim, values.data() + staged, DType::F16, "v"));
    }
  }
  return stageRows(layer, keys.data(), values.data(), n);
}

Status KiviStore::stageRows(int32_t layer, const uint16_t* keys, const uint16_t* values, int64_t n) {
  const int32_t kvHeads = shape_.kvHeads;
  const size_t dim = size_t(shape_.format.headDim);
  // Rows land after the live ones (or in fresh buffers), so the committed state stays valid
  // until every head succeeded.
  std::vector<Residual> newKeys, newValues;
  for (int32_t h = 0; h < kvHeads; ++h) {
    Residual keyResidual = head(layer, h).keys, valueResidual = head(layer, h).values;
    KVSLIM_RETURN_IF_ERROR(reserve(&keyResidual, n));
    KVSLIM_RETURN_IF_ERROR(reserve(&valueResidual, n));
    KVSLIM_RETURN_IF_ERROR(pushRows(&keyResidual, keys + size_t(h) * size_t(n) * dim, n));
    KVSLIM_RETURN_IF_ERROR(pushRows(&valueResidual, values + size_t(h) * size_t(n) * dim, n));
    newKeys.push_back(std::move(keyResidual));
    newValues.push_back(std::move(valueResidual));
  }
  for (int32_t h = 0; h < kvHeads; ++h) {
    head(layer, h).keys = std::move(newKeys[size_t(h)]);
    head(layer, h).values = std::move(newValues[size_t(h)]);
  }
  layerTokens_[size_t(layer)] += n;
  return Status::ok();
}

Status KiviStore::flush(int32_t layer) {
  const KiviFormat& format = shape_.format;
  const int64_t R = shape_.residual;
  const int64_t tokens = layerTokens_[size_t(layer)];
  const QuantizedCounts flushed = flushedCounts(tokens);
  const int64_t keysQuantized = flushed.keys, valuesQuantized = flushed.values;
  if (head(layer, 0).quantizedKeys == keysQuantized && head(layer, 0).quantizedValues == valuesQuantized) {
    return Status::ok();
  }
  // Every head holds its quantized rows and the rest in its residual buffers. Counts that disagree
  // (a state no call leaves) would send the row arithmetic below negative: an error, not an abort.
  for (int32_t h = 0; h < shape_.kvHeads; ++h) {
    const HeadState& state = head(layer, h);
    if (state.quantizedKeys > keysQuantized || state.quantizedValues > valuesQuantized ||
        state.keys.count != tokens - state.quantizedKeys || state.values.count != tokens - state.quantizedValues) {
      return Status(ErrorCode::Internal, "KIVI layer " + std::to_string(layer) + " kv head " + std::to_string(h) +
                                             ": its quantized and residual token counts disagree with its " +
                                             std::to_string(tokens) + " tokens");
    }
  }
  // Phase 1 quantizes every head on the backend's host threads (host mirrors only), then
  // allocates (new records, unshared residuals) aside; phase 2 only moves rows.
  const size_t heads = size_t(shape_.kvHeads);
  std::vector<std::vector<uint8_t>> keyRecords(heads), valueRecords(heads);
  std::vector<Status> quantized(heads);
  backend_->hostParallel(int64_t(heads), shape_.threads, [&](int64_t h) {
    try {
      quantized[size_t(h)] = quantizeHead(head(layer, int32_t(h)), keysQuantized, valuesQuantized, &keyRecords[size_t(h)],
                                          &valueRecords[size_t(h)]);
    } catch (const std::bad_alloc&) {
      quantized[size_t(h)] = Status(ErrorCode::OutOfMemory, "out of host memory quantizing KIVI records");
    }
  });
  for (const Status& status : quantized) KVSLIM_RETURN_IF_ERROR(status);
  std::vector<HeadState> updated;
  for (int32_t h = 0; h < shape_.kvHeads; ++h) {
    HeadState state = head(layer, h);
    const int64_t keyGroups = (keysQuantized - state.quantizedKeys) / format.group;
    KVSLIM_RETURN_IF_ERROR(appendRecords(&state.keyPages, state.quantizedKeys / format.group, keyGroupsPerPage(),
                                         format.keyGroupBytes(), keyRecords[size_t(h)].data(), keyGroups));
    const int64_t valueTokens = valuesQuantized - state.quantizedValues;
    KVSLIM_RETURN_IF_ERROR(appendRecords(&state.valuePages, state.quantizedValues, shape_.pageTokens,
                                         format.valueTokenBytes(), valueRecords[size_t(h)].data(), valueTokens));
    KVSLIM_RETURN_IF_ERROR(reserve(&state.keys, 0));
    KVSLIM_RETURN_IF_ERROR(reserve(&state.values, 0));
    state.quantizedKeys = keysQuantized;
    state.quantizedValues = valuesQuantized;
    updated.push_back(std::move(state));
  }
  for (int32_t h = 0; h < shape_.kvHeads; ++h) {
    HeadState& state = updated[size_t(h)];
    KVSLIM_RETURN_IF_ERROR(dropOldest(&state.keys, state.keys.count - (tokens - keysQuantized)));
    KVSLIM_RETURN_IF_ERROR(dropOldest(&state.values, state.values.count - (tokens - valuesQuantized)));
    // A long prefill grew the buffers; give the memory back.
    for (Residual* residual : {&state.keys, &state.values}) {
      if (residual->capacity > 2 * (R + 1)) shrink(residual);
    }
    releaseHole(&state);
    refreshPointers(&state);
  }
  for (int32_t h = 0; h < shape_.kvHeads; ++h) head(layer, h) = std::move(updated[size_t(h)]);
  return Status::ok();
}

namespace {

// Records of `keyGroups` key groups and `valueTokens` value tokens from f16 rows, oldest first:
// keyRow(i) / valueRow(i) is the i-th row to quantize. Shared by flush (rows in the residual
// buffers) and imageOf (rows given contiguous), so both write the same codes.
// Records already in the buffers (the first firstKeyGroup key groups and firstValueToken value
// tokens) are kept as they are.
template <class KeyRow, class ValueRow>
Status quantizeRecords(const KiviFormat& format, int64_t keyGroups, const KeyRow& keyRow, int64_t valueTokens,
                       const ValueRow& valueRow, std::vector<uint8_t>* keyRecords, std::vector<uint8_t>* valueRecords,
                       int64_t firstKeyGroup = 0, int64_t firstValueToken = 0) {
  const size_t dim = size_t(format.headDim);
  std::vector<float> rows(size_t(format.group) * dim);
  keyRecords->resize(size_t(keyGroups) * format.keyGroupBytes());
  for (int64_t g = firstKeyGroup; g < keyGroups; ++g) {
    for (int32_t t = 0; t < format.group; ++t) halvesToFloats(keyRow(g * format.group + t), rows.data() + size_t(t) * dim, dim);
    if (!quantizeKeyGroupRecord(rows.data(), format, keyRecords->data() + size_t(g) * format.keyGroupBytes())) {
      return Status(ErrorCode::Internal, "KIVI key group scale or outlier delta overflowed f16");
    }
  }
  valueRecords->resize(size_t(valueTokens) * format.valueTokenBytes());
  for (int64_t t = firstValueToken; t < valueTokens; ++t) {
    halvesToFloats(valueRow(t), rows.data(), dim);
    if (!quantizeValueTokenRecord(rows.data(), format, valueRecords->data() + size_t(t) * format.valueTokenBytes())) {
      return Status(ErrorCode::Internal, "KIVI value group scale or outlier delta overflowed f16");
    }
  }
  return Status::ok();
}

}  // namespace

Status KiviStore::imageOf(const uint16_t* keys, const uint16_t* values, int64_t n, HeadImage* out, const HeadImage* keep,
                          int64_t keepTokens) const {
  const KiviFormat& format = shape_.format;
  const size_t dim = size_t(format.headDim);
  const QuantizedCounts counts = flushedCounts(n);
  out->quantizedKeys = counts.keys;
  out->quantizedValues = counts.values;
  int64_t keptKeyGroups = 0, keptValueTokens = 0;
  if (keep != nullptr) {
    // The records both images quantize for the first keepTokens tokens, copied.
    keptKeyGroups = std::min({keepTokens, keep->quantizedKeys, out->quantizedKeys}) / format.group;
    keptValueTokens = std::min({keepTokens, keep->quantizedValues, out->quantizedValues});
    if (keep->hole.size() > 0) return Status(ErrorCode::Internal, "a KIVI image with a hole cannot be kept");
    out->keyRecords.assign(keep->keyRecords.begin(), keep->keyRecords.begin() + std::ptrdiff_t(size_t(keptKeyGroups) * format.keyGroupBytes()));
    out->valueRecords.assign(keep->valueRecords.begin(),
                             keep->valueRecords.begin() + std::ptrdiff_t(size_t(keptValueTokens) * format.valueTokenBytes()));
  }
  KVSLIM_RETURN_IF_ERROR(quantizeRecords(
      format, out->quantizedKeys / format.group, [&](int64_t i) { return keys + size_t(i) * dim; }, out->quantizedValues,
      [&](int64_t i) { return values + size_t(i) * dim; }, &out->keyRecords, &out->valueRecords, keptKeyGroups, keptValueTokens));
  out->keyRows.assign(keys + size_t(out->quantizedKeys) * dim, keys + size_t(n) * dim);
  out->valueRows.assign(values + size_t(out->quantizedValues) * dim, values + size_t(n) * dim);
  return Status::ok();
}

Status KiviStore::rowsOf(const HeadImage& image, int64_t tokens, uint16_t* keys, uint16_t* values) const {
  const KiviFormat& format = shape_.format;
  const size_t dim = size_t(format.headDim), group = size_t(format.group);
  const size_t keyGroups = size_t(image.quantizedKeys) / group, valueTokens = size_t(image.quantizedValues);
  if (image.hole.size() > 0 || image.keyRecords.size() != keyGroups * format.keyGroupBytes() ||
      image.valueRecords.size() != valueTokens * format.valueTokenBytes() ||
      image.keyRows.size() != size_t(tokens - image.quantizedKeys) * dim ||
      image.valueRows.size() != size_t(tokens - image.quantizedValues) * dim) {
    return Status(ErrorCode::Internal, "a KIVI head image does not match its token count");
  }
  std::vector<float> rows(group * dim);
  const HostTensor floats{rows.data(), DType::F32, rows.size()};
  for (size_t g = 0; g < keyGroups; ++g) {
    dequantizeKeyGroupRecord(image.keyRecords.data() + g * format.keyGroupBytes(), format, rows.data());
    KVSLIM_RETURN_IF_ERROR(convertChecked(floats, 0, group * dim, keys + g * group * dim, DType::F16, "dequantized keys"));
  }
  for (size_t t = 0; t < valueTokens; ++t) {
    dequantizeValueTokenRecord(image.valueRecords.data() + t * format.valueTokenBytes(), format, rows.data());
    KVSLIM_RETURN_IF_ERROR(convertChecked(floats, 0, dim, values + t * dim, DType::F16, "dequantized values"));
  }
  std::copy(image.keyRows.begin(), image.keyRows.end(), keys + keyGroups * group * dim);
  std::copy(image.valueRows.begin(), image.valueRows.end(), values + valueTokens * dim);
  return Status::ok();
}

Status KiviStore::quantizeHead(const HeadState& state, int64_t keysQuantized, int64_t valuesQuantized,
                               std::vector<uint8_t>* keyRecords, std::vector<uint8_t>* valueRecords) const {
  const KiviFormat& format = shape_.format;
  return quantizeRecords(
      format, (keysQuantized - state.quantizedKeys) / format.group, [&](int64_t i) { return hostRow(state.keys, i); },
      valuesQuantized - state.quantizedValues, [&](int64_t i) { return hostRow(state.values, i); }, keyRecords,
      valueRecords);
}

KiviHeadView KiviStore::view(int32_t layer, int32_t h) const {
  const HeadState& state = head(layer, h);
  KiviHeadView view;
  view.keyPages = state.keyPointers.data();
  view.quantizedKeys = state.quantizedKeys;
  view.keyResidual = state.keys.device ? static_cast<const uint16_t*>(state.keys.device->memory()) : nullptr;
  view.valuePages = state.valuePointers.data();
  view.quantizedValues = state.quantizedValues;
  view.valueResidual = state.values.device ? static_cast<const uint16_t*>(state.values.device->memory()) : nullptr;
  view.valueRingStart = state.values.start;
  view.tokens = layerTokens_[size_t(layer)];
  view.holeBegin = state.hole.begin;
  view.holeEnd = state.hole.end;
  view.releasedFirst = firstReleased(state.hole);
  view.releasedKeyPages = state.releasedKeyPages;
  view.releasedValuePages = state.releasedValuePages;
  return view;
}

KiviLayerBytes KiviStore::layerBytes(int32_t layer) const {
  const KiviFormat& format = shape_.format;
  KiviLayerBytes bytes;
  for (int32_t h = 0; h < shape_.kvHeads; ++h) {
    const HeadState& state = head(layer, h);
    bytes.quantized += double(heldKeyGroups(state.hole, state.quantizedKeys)) * double(format.keyGroupBytes()) +
                       double(heldValueTokens(state.hole, state.quantizedValues)) * double(format.valueTokenBytes());
    bytes.residual += double(state.keys.count + state.values.count) * double(format.headDim) * 2.0;
  }
  return bytes;
}

double KiviStore::allocatedBytes() const {
  const KiviFormat& format = shape_.format;
  const double keyPage = double(keyGroupsPerPage()) * double(format.keyGroupBytes());
  const double valuePage = double(shape_.pageTokens) * double(format.valueTokenBytes());
  double total = 0;
  for (const HeadState& state : heads_) {
    total += double(state.keyPages.size()) * keyPage + double(state.valuePages.size()) * valuePage;
    total += double(state.keys.capacity + state.values.capacity) * double(format.headDim) * 2.0;
  }
  return total;
}

double KiviStore::sharedBytes() const {
  const KiviFormat& format = shape_.format;
  const double keyPage = double(keyGroupsPerPage()) * double(format.keyGroupBytes());
  const double valuePage = double(shape_.pageTokens) * double(format.valueTokenBytes());
  double total = 0;
  for (const HeadState& state : heads_) {
    for (const auto& page : state.keyPages) total += page.use_count() > 1 ? keyPage : 0.0;
    for (const auto& page : state.valuePages) total += page.use_count() > 1 ? valuePage : 0.0;
    for (const Residual* residual : {&state.keys, &state.values}) {
      if (residual->device != nullptr && residual->device.use_count() > 1) {
        total += double(residual->capacity) * double(format.headDim) * 2.0;
      }
    }
  }
  return total;
}

size_t KiviStore::pageCount() const {
  size_t count = 0;
  for (const HeadState& state : heads_) count += state.keyPages.size() + state.valuePages.size();
  return count;
}

Status KiviStore::readHead(int32_t layer, int32_t h, HeadImage* out) const {
  const KiviFormat& format = shape_.format;
  const HeadState& state = head(layer, h);
  out->quantizedKeys = state.quantizedKeys;
  out->quantizedValues = state.quantizedValues;
  out->hole = state.hole;
  out->keyRecords.resize(size_t(heldKeyGroups(state.hole, state.quantizedKeys)) * format.keyGroupBytes());
  out->valueRecords.resize(size_t(heldValueTokens(state.hole, state.quantizedValues)) * format.valueTokenBytes());
  KVSLIM_RETURN_IF_ERROR(readRecords(state.keyPages, state.hole, state.quantizedKeys, keyGroupsPerPage(),
                                     format.keyGroupBytes(), state.releasedKeyPages, &out->keyRecords));
  KVSLIM_RETURN_IF_ERROR(readRecords(state.valuePages, state.hole, state.quantizedValues, shape_.pageTokens,
                                     format.valueTokenBytes(), state.releasedValuePages, &out->valueRecords));
  const size_t dim = size_t(format.headDim);
  out->keyRows.resize(size_t(state.keys.count) * dim);
  for (int64_t i = 0; i < state.keys.count; ++i) std::memcpy(&out->keyRows[size_t(i) * dim], hostRow(state.keys, i), dim * 2);
  out->valueRows.resize(size_t(state.values.count) * dim);
  for (int64_t i = 0; i < state.values.count; ++i) {
    std::memcpy(&out->valueRows[size_t(i) * dim], hostRow(state.values, i), dim * 2);
  }
  return Status::ok();
}

// The records of the held pages of a list, in order (`records` sized by the caller).
Status KiviStore::readRecords(const std::vector<std::shared_ptr<Page>>& pages, const Hole& hole, int64_t quantized,
                              int64_t perPage, size_t recordBytes, int64_t released, std::vector<uint8_t>* records) const {
  const int64_t total = quantized * perPage / shape_.pageTokens;  // records written
  const int64_t first = firstReleased(hole);
  size_t at = 0;
  for (int64_t p = 0; p * perPage < total; ++p) {
    if (p >= first && p < first + released) continue;
    const size_t entry = size_t(p >= first ? p - released : p);
    const size_t bytes = size_t(std::min(perPage, total - p * perPage)) * recordBytes;
    if (at + bytes > records->size() || entry >= pages.size()) {
      return Status(ErrorCode::Internal, "a KIVI page list holds more records than counted");
    }
    KVSLIM_RETURN_IF_ERROR(backend_->download(records->data() + at, pages[entry]->memory(), bytes));
    at += bytes;
  }
  return Status::ok();
}

// Pages of a list from its held records (released pages get no entry); `records` were sized by
// the caller (heldKeyGroups / heldValueTokens).
Status KiviStore::writeRecords(std::vector<std::shared_ptr<Page>>* pages, const Hole& hole, int64_t quantized,
                               int64_t perPage, size_t recordBytes, const std::vector<uint8_t>& records) {
  const int64_t total = quantized * perPage / shape_.pageTokens;
  const int64_t first = firstReleased(hole), released = releasedPages(hole, quantized);
  size_t at = 0;
  for (int64_t p = 0; p * perPage < total; ++p) {
    if (p >= first && p < first + released) continue;
    const size_t bytes = size_t(std::min(perPage, total - p * perPage)) * recordBytes;
    if (at + bytes > records.size()) return Status(ErrorCode::Internal, "a KIVI image holds fewer records than its counts");
    std::shared_ptr<Page> page;
    KVSLIM_RETURN_IF_ERROR(newPage(size_t(perPage) * recordBytes, &page));
    KVSLIM_RETURN_IF_ERROR(backend_->upload(page->memory(), records.data() + at, bytes));
    pages->push_back(std::move(page));
    at += bytes;
  }
  return Status::ok();
}

Status KiviStore::writeHead(int32_t layer, int32_t h, int64_t tokens, const HeadImage& image) {
  const KiviFormat& format = shape_.format;
  const size_t dim = size_t(format.headDim);
  HeadState state;
  state.values.ring = true;
  state.hole = image.hole;
  KVSLIM_RETURN_IF_ERROR(writeRecords(&state.keyPages, image.hole, image.quantizedKeys, keyGroupsPerPage(),
                                      format.keyGroupBytes(), image.keyRecords));
  KVSLIM_RETURN_IF_ERROR(writeRecords(&state.valuePages, image.hole, image.quantizedValues, shape_.pageTokens,
                                      format.valueTokenBytes(), image.valueRecords));
  state.releasedKeyPages = releasedPages(image.hole, image.quantizedKeys);
  state.releasedValuePages = releasedPages(image.hole, image.quantizedValues);
  const int64_t keyRows = int64_t(image.keyRows.size() / dim), valueRows = int64_t(image.valueRows.size() / dim);
  KVSLIM_RETURN_IF_ERROR(reserve(&state.keys, keyRows));
  KVSLIM_RETURN_IF_ERROR(reserve(&state.values, valueRows));
  KVSLIM_RETURN_IF_ERROR(pushRows(&state.keys, image.keyRows.data(), keyRows));
  KVSLIM_RETURN_IF_ERROR(pushRows(&state.values, image.valueRows.data(), valueRows));
  state.quantizedKeys = image.quantizedKeys;
  state.quantizedValues = image.quantizedValues;
  refreshPointers(&state);
  head(layer, h) = std::move(state);
  layerTokens_[size_t(layer)] = tokens;
  return Status::ok();
}

}  // namespace kvslim
