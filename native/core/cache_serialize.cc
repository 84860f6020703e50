// save()/load() of a KVCache. Layout (little-endian):
//   magic "KVSLIM02" (saves before XXH64: "KVSLIM01") | u32 version | i32 layers, qHeads, kvHeads, headDim, storeType | i64 pageTokens
//   | f32 scale | (version >= 2) i32 storeKind, kiviBits, kiviGroup | i64 kiviResidual
//   | (version 3) f64 kiviOutliers (the dense-and-sparse fraction; written only when it is > 0, so
//   every other cache still saves as version 2, byte for byte as before)
//   | (version 4, written only for policy.store.preRope) f64 kiviOutliers (>= 0) | i32 kiviPreRope (1)
//   | f32 ropeTheta | i32 ropeStyle (0 adjacent, 1 half)
//   | (version 5, written only for a loading policy, dense stores; no version 3/4 fields) the policy:
//   i32 kind | i64 sink, window, pageSize, pages, topK, trainQueries, blockSize, blocks
//   | i32 reprTopK, queryWindow | f64 questionWeight, temperature
//   | i32 index kind, lists, probes, degree, beam, neighbors, threads | u64 seed.
//   Version 5 holds no index: a loaded cache indexes its tokens again at its first decode call
//   (the graph from its keys alone, ActQKV with fresh statistics). Quest and the flat scan, whose
//   choices follow from the keys alone, still save as version 5, byte for byte as before.
//   | (version 8: a loading policy with state, ivf, graph and actqkv; version 5's fields) u64
//   stateBytes | the policy's state (SelectPolicy::saveState: its indexes, statistics and extents,
//   checked against the restored store on load, after the payload).
//   | i64 tokens[layers] | per layer, per kv head: the head's payload | u64 checksum of everything
//   before it: XXH64 (seed 0) under magic KVSLIM02, FNV-1a 64 under KVSLIM01 (still loaded).
// Dense payload: keys then values, tokens x headDim elements in store dtype.
// KIVI payload: i64 quantizedKeys, quantizedValues | (version 7) i64 holeBegin, holeEnd | key group
//   records | value token records (records as in kivi_format.h, outliers included; version 7 omits
//   those of the pages the hole released, KiviStore::releasedPages)
//   | f16 residual keys (tokens - quantizedKeys rows) | f16 residual values (tokens - quantizedValues rows).
// load() checks every field and the exact size before it allocates, then the hash.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <string>

#include "byte_io.h"
#include "kv_cache.h"
#include "shape_checks.h"
#include "xxhash64.h"

namespace kvslim {

namespace {
constexpr char kMagic[8] = {'K', 'V', 'S', 'L', 'I', 'M', '0', '2'};
// Saves whose checksum is FNV-1a 64: a dependent multiply per byte, most of a large save's time.
constexpr char kMagicFnv[8] = {'K', 'V', 'S', 'L', 'I', 'M', '0', '1'};
constexpr uint32_t kVersion = 8;  // 1: dense stores only, no store kind fields; 2: no kiviOutliers; 3: no preRope; 4: no policy;
                                  // 5: loading policies; 6: eviction policies; 7: window policies over KIVI
                                  // (6 + i32 kiviPreRope after the rope style, and each KIVI head's hole);
                                  // 8: loading policies with their state (5 + the state)

uint64_t fnv1a(const uint8_t* data, size_t size) {
  uint64_t hash = 14695981039346656037ull;  // FNV-1a 64 offset basis
  for (size_t i = 0; i < size; ++i) hash = (hash ^ data[i]) * 1099511628211ull;
  return hash;
}

Status corrupt(const std::string& what) { return Status(ErrorCode::Corrupt, "cannot load cache: " + what); }

// The trailing u64 checksum of everything before it (size >= 8), by the buffer's magic.
Status checkHash(const uint8_t* data, size_t size) {
  uint64_t stored = 0;
  std::memcpy(&stored, data + size - 8, 8);
  const uint64_t computed = std::memcmp(data, kMagicFnv, 8) == 0 ? fnv1a(data, size - 8) : xxh64(data, size - 8);
  return stored == computed ? Status::ok() : corrupt("the checksum does not match (damaged data)");
}

// False when any of `count` f16 values (unaligned bytes) is an infinity or NaN.
bool finiteHalves(const uint8_t* bytes, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    uint16_t half;
    std::memcpy(&half, bytes + 2 * i, 2);
    if ((half & 0x7c00u) == 0x7c00u) return false;
  }
  return true;
}

// False when any of `count` stored values (unaligned bytes, store dtype) is an infinity or NaN.
bool finiteRows(const uint8_t* bytes, size_t count, DType type) {
  if (type == DType::F16) return finiteHalves(bytes, count);
  for (size_t i = 0; i < count; ++i) {
    if (type == DType::BF16) {
      uint16_t half;
      std::memcpy(&half, bytes + 2 * i, 2);
      if ((half & 0x7f80u) == 0x7f80u) return false;
    } else {
      float value;
      std::memcpy(&value, bytes + 4 * i, 4);
      if (!std::isfinite(value)) return false;
    }
  }
  return true;
}

// The loading policy of a version 5 header; create() checks its values (ERR_OPTION -> corrupt).
Status readLoadingPolicy(ByteReader* reader, int32_t storeKind, SelectConfig* select) {
  int32_t kind = 0, indexKind = 0;
  IndexOptions& index = select->index;
  bool complete = reader->get(&kind);
  for (int64_t* value : {&select->sink, &select->window, &select->pageSize, &select->pages, &select->topK,
                         &select->trainQueries, &select->blockSize, &select->blocks}) {
    complete = complete && reader->get(value);
  }
  complete = complete && reader->get(&select->reprTopK) && reader->get(&select->queryWindow) &&
             reader->get(&select->questionWeight) && reader->get(&select->temperature) && reader->get(&indexKind);
  for (int32_t* value : {&index.lists, &index.probes, &index.degree, &index.beam, &index.neighbors, &index.threads}) {
    complete = complete && reader->get(value);
  }
  complete = complete && reader->get(&index.seed);
  if (!complete) return corrupt("the header is truncated");
  if (storeKind != 0) return corrupt("a loading policy with a KIVI store");
  if (kind != int32_t(SelectKind::Quest) && kind != int32_t(SelectKind::Retrieval) && kind != int32_t(SelectKind::ActQKV)) {
    return corrupt("unknown loading policy kind " + std::to_string(kind));
  }
  if (indexKind < 0 || indexKind > 2) return corrupt("unknown index kind " + std::to_string(indexKind));
  select->kind = SelectKind(kind);
  index.kind = IndexKind(indexKind);
  return Status::ok();
}

// One KIVI head's image as readKiviHead reads it back.
void putKiviHead(const KiviStore::HeadImage& image, bool holes, std::vector<uint8_t>* out) {
  ByteWriter writer(out);
  writer.put(image.quantizedKeys);
  writer.put(image.quantizedValues);
  if (holes) {
    writer.put(image.hole.begin);
    writer.put(image.hole.end);
  }
  out->insert(out->end(), image.keyRecords.begin(), image.keyRecords.end());
  out->insert(out->end(), image.valueRecords.begin(), image.valueRecords.end());
  for (const std::vector<uint16_t>* rows : {&image.keyRows, &image.valueRows}) {
    const auto* bytes = reinterpret_cast<const uint8_t*>(rows->data());
    out->insert(out->end(), bytes, bytes + rows->size() * 2);
  }
}

// Whether a saved KIVI head of `count` tokens holds the quantized counts every call leaves
// (KiviStore::flushedCounts). Other counts would send a later flush's row arithmetic negative.
bool flushedCounts(const KiviStore& store, int64_t count, int64_t keys, int64_t values) {
  const KiviStore::QuantizedCounts expected = store.flushedCounts(count);
  return keys == expected.keys && values == expected.values;
}

// One KIVI head's image at data[*position, end): i64 quantizedKeys, quantizedValues | key group
// records | value token records | f16 residual keys | f16 residual values, for a layer of `count`
// tokens. Checks counts, sizes, that every f16 number is finite and that outlier indices stay
// inside their record before the caller writes it into a store.
Status readKiviHead(const uint8_t* data, size_t end, size_t* cursor, int64_t count, const KiviStore& store, bool holes,
                    KiviStore::HeadImage* out) {
  const KiviFormat& format = store.shape().format;
  KiviStore::HeadImage& image = *out;
  size_t& position = *cursor;
  if (end < position || end - position < 16) return corrupt("the KIVI payload is truncated");
  std::memcpy(&image.quantizedKeys, data + position, 8);
  std::memcpy(&image.quantizedValues, data + position + 8, 8);
  if (!flushedCounts(store, count, image.quantizedKeys, image.quantizedValues)) {
    return corrupt("a KIVI head's quantized token counts do not match its token count and residual");
  }
  position += 16;
  image.hole = {};
  if (holes) {
    if (end - position < 16) return corrupt("the KIVI payload is truncated");
    std::memcpy(&image.hole.begin, data + position, 8);
    std::memcpy(&image.hole.end, data + position + 8, 8);
    position += 16;
    if (image.hole.begin < 0 || image.hole.begin > image.hole.end || image.hole.end > count) {
      return corrupt("a KIVI head's hole is out of range");
    }
  }
  const size_t rowBytes = size_t(format.headDim) * 2;
  const size_t keyBytes = size_t(store.heldKeyGroups(image.hole, image.quantizedKeys)) * format.keyGroupBytes();
  const size_t valueBytes = size_t(store.heldValueTokens(image.hole, image.quantizedValues)) * format.valueTokenBytes();
  const size_t residualBytes = size_t(2 * count - image.quantizedKeys - image.quantizedValues) * rowBytes;
  if (end - position < keyBytes || end - position - keyBytes < valueBytes ||
      end - position - keyBytes - valueBytes < residualBytes) {
    return corrupt("the KIVI payload is truncated");
  }
  auto take = [&](size_t bytes) {
    const uint8_t* begin = data + position;
    position += bytes;
    return begin;
  };
  const uint8_t* keyRecords = take(keyBytes);
  image.keyRecords.assign(keyRecords, keyRecords + keyBytes);
  const uint8_t* valueRecords = take(valueBytes);
  image.valueRecords.assign(valueRecords, valueRecords + valueBytes);
  image.keyRows.resize(size_t(count - image.quantizedKeys) * size_t(format.headDim));
  std::memcpy(image.keyRows.data(), take(image.keyRows.size() * 2), image.keyRows.size() * 2);
  image.valueRows.resize(size_t(count - image.quantizedValues) * size_t(format.headDim));
  std::memcpy(image.valueRows.data(), take(image.valueRows.size() * 2), image.valueRows.size() * 2);
  // Scales, minima and residual rows are f16 numbers; an infinity would poison every output.
  bool finite = finiteHalves(reinterpret_cast<const uint8_t*>(image.keyRows.data()), image.keyRows.size()) &&
                finiteHalves(reinterpret_cast<const uint8_t*>(image.valueRows.data()), image.valueRows.size());
  for (size_t g = 0; finite && g < image.keyRecords.size() / format.keyGroupBytes(); ++g) {
    finite = finiteHalves(image.keyRecords.data() + g * format.keyGroupBytes() + format.keyGroupCodeBytes(),
                          2 * size_t(format.headDim));
  }
  for (size_t t = 0; finite && t < image.valueRecords.size() / format.valueTokenBytes(); ++t) {
    finite = finiteHalves(image.valueRecords.data() + t * format.valueTokenBytes() + format.valueCodeBytes(),
                          2 * size_t(format.channelGroups()));
  }
  // Outliers: finite deltas, indices inside the record (the kernels index q and out by them).
  const size_t keyEntries = size_t(format.group) * size_t(format.headDim);
  bool inside = true;
  for (size_t g = 0; finite && inside && g < image.keyRecords.size() / format.keyGroupBytes(); ++g) {
    const uint8_t* outliers = image.keyRecords.data() + g * format.keyGroupBytes() + format.keyOutlierOffset();
    finite = finiteHalves(outliers + 2 * size_t(format.keyOutliers), size_t(format.keyOutliers));
    for (int32_t i = 0; inside && i < format.keyOutliers; ++i) {
      uint16_t index;
      std::memcpy(&index, outliers + 2 * size_t(i), 2);
      inside = index < keyEntries;
    }
  }
  for (size_t t = 0; finite && inside && t < image.valueRecords.size() / format.valueTokenBytes(); ++t) {
    const uint8_t* outliers = image.valueRecords.data() + t * format.valueTokenBytes() + format.valueOutlierOffset();
    finite = finiteHalves(outliers + 2 * size_t(format.valueOutliers), size_t(format.valueOutliers));
    for (int32_t i = 0; inside && i < format.valueOutliers; ++i) {
      uint16_t index;
      std::memcpy(&index, outliers + 2 * size_t(i), 2);
      inside = index < size_t(format.headDim);
    }
  }
  if (!finite) return corrupt("a KIVI scale, minimum, outlier delta or residual value is not finite");
  if (!inside) return corrupt("a KIVI outlier index is out of range");
  return Status::ok();
}
}  // namespace

Status KVCache::save(std::vector<uint8_t>* out) const {
  const bool loading = policy_ && policy_->loads();
  const bool evicting = policy_ && !loading;
  try {
    std::vector<uint8_t> state;
    if (loading) KVSLIM_RETURN_IF_ERROR(policy_->saveState(config_.layers, &state));
    // What the cache holds, bounded from above: the rows (or KIVI records and residual rows) and
    // per held token 24 bytes of position, score and flag, plus headers and the state. One
    // reservation, so the payload is written once (no regrowth copies). Held, not seen: a
    // streaming cache that has seen billions of tokens holds a few thousand per head.
    size_t estimate = 4096 + state.size();
    const size_t keyValueBytes = 2 * size_t(config_.headDim) * dtypeBytes(config_.storeType);
    for (int32_t layer = 0; layer < config_.layers; ++layer) {
      estimate += 64 * (size_t(config_.kvHeads) + 1);
      if (inKivi(layer)) {
        const KiviLayerBytes bytes = kivi_.layerBytes(layer);
        estimate += size_t(bytes.quantized + bytes.residual);
        // A window policy's hole holds nothing.
        for (int32_t h = 0; h < config_.kvHeads; ++h) estimate += size_t(kivi_.tokens(layer) - kivi_.hole(layer, h).size()) * 24;
        continue;
      }
      for (int32_t h = 0; h < config_.kvHeads; ++h) {
        estimate += size_t(store_.keptTokens(layer, h) + store_.tailTokens(layer, h)) * (keyValueBytes + 24);
      }
    }
    out->clear();
    out->shrink_to_fit();
    reserveOutput(out, estimate);
    ByteWriter writer(out);
    out->resize(sizeof(kMagic));
    std::memcpy(out->data(), kMagic, sizeof(kMagic));
    const bool preRope = kivi() && config_.kiviPreRope;
    const bool outliers = kivi() && config_.kiviOutliers > 0.0;
    writer.put(kiviHoles() ? uint32_t(7) : evicting ? uint32_t(6) : loading ? uint32_t(state.empty() ? 5 : 8)
                                                                            : preRope ? uint32_t(4) : outliers ? uint32_t(3) : uint32_t(2));
    writer.put(config_.layers);
    writer.put(config_.qHeads);
    writer.put(config_.kvHeads);
    writer.put(config_.headDim);
    writer.put(int32_t(config_.storeType));
    writer.put(config_.pageTokens);
    writer.put(config_.scale);
    writer.put(int32_t(config_.storeKind));
    writer.put(config_.kiviBits);
    writer.put(config_.kiviGroup);
    writer.put(config_.kiviResidual);
    if (evicting) return saveEvicting(out);
    if (loading) {
      const SelectConfig& s = config_.select;
      writer.put(int32_t(s.kind));
      for (const int64_t value : {s.sink, s.window, s.pageSize, s.pages, s.topK, s.trainQueries, s.blockSize, s.blocks}) writer.put(value);
      writer.put(s.reprTopK);
      writer.put(s.queryWindow);
      writer.put(s.questionWeight);
      writer.put(s.temperature);
      const IndexOptions& index = s.index;
      for (const int32_t value : {int32_t(index.kind), index.lists, index.probes, index.degree, index.beam, index.neighbors, index.threads}) {
        writer.put(value);
      }
      writer.put(index.seed);
      if (!state.empty()) {
        writer.put(uint64_t(state.size()));
        out->insert(out->end(), state.begin(), state.end());
      }
    }
    if (outliers || preRope) writer.put(config_.kiviOutliers);
    if (preRope) {
      writer.put(int32_t(1));
      writer.put(config_.rope.theta);
      writer.put(int32_t(config_.rope.style));
    }
    for (int32_t layer = 0; layer < config_.layers; ++layer) writer.put(tokens(layer));
    if (kivi()) {
      KiviStore::HeadImage image;
      for (int32_t layer = 0; layer < config_.layers; ++layer) {
        for (int32_t h = 0; h < config_.kvHeads; ++h) {
          KVSLIM_RETURN_IF_ERROR(kivi_.readHead(layer, h, &image));
          putKiviHead(image, false, out);
        }
      }
      writer.put(xxh64(out->data(), out->size()));
      return Status::ok();
    }
    const size_t rowBytes = size_t(config_.headDim) * dtypeBytes(config_.storeType);
    for (int32_t layer = 0; layer < config_.layers; ++layer) {
      const int64_t tokens = store_.tokens(layer);
      for (int32_t h = 0; h < config_.kvHeads; ++h) {
        const size_t offset = out->size();
        out->resize(offset + 2 * size_t(tokens) * rowBytes);
        KVSLIM_RETURN_IF_ERROR(
            store_.readRows(layer, h, 0, tokens, out->data() + offset, out->data() + offset + size_t(tokens) * rowBytes));
      }
    }
    writer.put(xxh64(out->data(), out->size()));
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory in save()");
  }
  return Status::ok();
}

Status KVCache::load(const uint8_t* data, size_t size, std::shared_ptr<Backend> backend, int32_t threads,
                     std::unique_ptr<KVCache>* out) {
  ByteReader reader(data, size);
  if (size < 8 || (std::memcmp(data, kMagic, 8) != 0 && std::memcmp(data, kMagicFnv, 8) != 0)) {
    return corrupt("the buffer does not start with KVSLIM02 (or KVSLIM01)");
  }
  uint64_t skipMagic;
  reader.get(&skipMagic);
  uint32_t version = 0;
  CacheConfig config;
  int32_t storeType = 0;
  if (!reader.get(&version) || !reader.get(&config.layers) || !reader.get(&config.qHeads) ||
      !reader.get(&config.kvHeads) || !reader.get(&config.headDim) || !reader.get(&storeType) ||
      !reader.get(&config.pageTokens) || !reader.get(&config.scale)) {
    return corrupt("the header is truncated");
  }
  if (version < 1 || version > kVersion) return corrupt("unsupported version " + std::to_string(version));
  int32_t storeKind = 0;
  if (version >= 2 && (!reader.get(&storeKind) || !reader.get(&config.kiviBits) || !reader.get(&config.kiviGroup) ||
                       !reader.get(&config.kiviResidual))) {
    return corrupt("the header is truncated");
  }
  if ((version == 3 || version == 4) && !reader.get(&config.kiviOutliers)) return corrupt("the header is truncated");
  if (version == 3 && (storeKind != 1 || !(config.kiviOutliers > 0.0 && config.kiviOutliers <= 1.0))) {
    return corrupt("the KIVI outlier fraction is out of range");
  }
  // Version 8: the loading policy's state, taken back once the store holds the saved tokens.
  uint64_t stateBytes = 0;
  size_t stateOffset = 0;
  if (version == 5 || version == 8) KVSLIM_RETURN_IF_ERROR(readLoadingPolicy(&reader, storeKind, &config.select));
  if (version == 8) {
    if (!reader.get(&stateBytes) || stateBytes > size - reader.offset()) return corrupt("the policy state is truncated");
    stateOffset = reader.offset();
    reader.skip(size_t(stateBytes));
  }
  if (version == 4) {
    int32_t preRope = 0, ropeStyle = 0;
    if (!reader.get(&preRope) || !reader.get(&config.rope.theta) || !reader.get(&ropeStyle)) {
      return corrupt("the header is truncated");
    }
    if (storeKind != 1 || !(config.kiviOutliers >= 0.0 && config.kiviOutliers <= 1.0)) {
      return corrupt("the KIVI outlier fraction is out of range");
    }
    if (preRope != 1 || !(config.rope.theta > 0.0f) || !std::isfinite(config.rope.theta) ||
        (ropeStyle != 0 && ropeStyle != 1)) {
      return corrupt("the KIVI pre-RoPE fields are out of range");
    }
    config.kiviPreRope = true;
    config.rope.style = RopeStyle(ropeStyle);
  }
  if (storeKind != 0 && storeKind != 1) return corrupt("unknown store kind " + std::to_string(storeKind));
  config.storeKind = StoreKind(storeKind);
  if (storeType < 0 || storeType > 2) return corrupt("unknown store dtype " + std::to_string(storeType));
  config.storeType = DType(storeType);
  config.threads = threads;
  if (config.layers <= 0 || config.layers > (1 << 16)) return corrupt("layers out of range");
  Status valid = checkHeads(config.qHeads, config.kvHeads, config.headDim);
  if (!valid.isOk()) return corrupt(valid.message());
  if (config.pageTokens <= 0 || config.pageTokens > (1 << 20)) return corrupt("pageTokens out of range");
  if (!(config.scale > 0.0f) || !std::isfinite(config.scale)) return corrupt("scale must be positive and finite");
  if (version == 6 || version == 7) return loadEvicting(data, size, reader.offset(), config, std::move(backend), out, version == 7);
  if (config.storeKind == StoreKind::Kivi) return loadKivi(data, size, reader.offset(), config, std::move(backend), out);
  std::vector<int64_t> tokens(size_t(config.layers));
  const size_t rowBytes = size_t(config.headDim) * dtypeBytes(config.storeType);
  // Sum the payload in a way that cannot overflow: every layer's count is bounded by the buffer.
  size_t payload = 0;
  for (int64_t& count : tokens) {
    if (!reader.get(&count)) return corrupt("the token counts are truncated");
    if (count < 0 || uint64_t(count) > size / rowBytes) return corrupt("a token count exceeds the buffer");
    const size_t layerBytes = 2 * size_t(count) * rowBytes * size_t(config.kvHeads);
    if (layerBytes > size || payload > size - layerBytes) return corrupt("the token counts exceed the buffer");
    payload += layerBytes;
  }
  if (size < reader.offset() + 8 || size - reader.offset() - 8 != payload) {
    return corrupt("the buffer holds " + std::to_string(size) + " bytes, but its header describes " +
                   std::to_string(reader.offset() + payload + 8));
  }
  KVSLIM_RETURN_IF_ERROR(checkHash(data, size));

  std::unique_ptr<KVCache> cache;
  const Status created = create(config, std::move(backend), &cache);
  if (created.code() == ErrorCode::Option) return corrupt(created.message());
  KVSLIM_RETURN_IF_ERROR(created);
  try {
    size_t offset = reader.offset();
    std::vector<uint8_t> keys, values;
    for (int32_t layer = 0; layer < config.layers; ++layer) {
      const int64_t count = tokens[size_t(layer)];
      if (count == 0) continue;
      // Re-interleave head-major blocks into the [n, kvHeads, headDim] layout that append takes.
      keys.resize(size_t(count) * size_t(config.kvHeads) * rowBytes);
      values.resize(keys.size());
      for (int32_t h = 0; h < config.kvHeads; ++h) {
        for (int64_t t = 0; t < count; ++t) {
          const size_t dst = (size_t(t) * size_t(config.kvHeads) + size_t(h)) * rowBytes;
          std::memcpy(keys.data() + dst, data + offset + size_t(t) * rowBytes, rowBytes);
          std::memcpy(values.data() + dst, data + offset + (size_t(count) + size_t(t)) * rowBytes, rowBytes);
        }
        offset += 2 * size_t(count) * rowBytes;
      }
      const size_t elements = keys.size() / dtypeBytes(config.storeType);
      HostTensor k{keys.data(), config.storeType, elements};
      HostTensor v{values.data(), config.storeType, elements};
      Status appended = cache->append(layer, k, v);
      if (appended.code() == ErrorCode::Value) return corrupt(appended.message());
      KVSLIM_RETURN_IF_ERROR(appended);
    }
    if (version == 8) {
      RestoredStores restored{cache->store_, std::vector<int64_t>(size_t(config.layers), -1), config.qHeads, config.threads};
      KVSLIM_RETURN_IF_ERROR(cache->policy_->loadState(data + stateOffset, size_t(stateBytes), restored, config.layers));
    }
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory in load()");
  }
  *out = std::move(cache);
  return Status::ok();
}

Status KVCache::saveEvicting(std::vector<uint8_t>* out) const {
  ByteWriter writer(out);
  const SelectConfig& s = config_.select;
  writer.put(config_.kiviOutliers);
  writer.put(config_.rope.theta);
  writer.put(int32_t(config_.rope.style));
  const bool holes = kiviHoles();
  if (holes) writer.put(int32_t(config_.kiviPreRope ? 1 : 0));
  writer.put(int32_t(s.kind));
  for (const int64_t value : {s.sink, s.window, s.budget}) writer.put(value);
  writer.put(s.kernel);
  writer.put(int32_t(s.pooling));
  writer.put(s.beta);
  writer.put(s.recent);
  writer.put(int32_t(s.cachePositions ? 1 : 0));
  writer.put(uint64_t(s.retrieval.size()));
  out->insert(out->end(), s.retrieval.begin(), s.retrieval.end());
  std::vector<uint8_t> state;
  KVSLIM_RETURN_IF_ERROR(policy_->saveState(config_.layers, &state));
  writer.put(uint64_t(state.size()));
  out->insert(out->end(), state.begin(), state.end());
  for (int32_t layer = 0; layer < config_.layers; ++layer) writer.put(tokens(layer));
  const size_t rowBytes = size_t(config_.headDim) * dtypeBytes(config_.storeType);
  for (int32_t layer = 0; layer < config_.layers; ++layer) {
    const bool quantized = inKivi(layer);
    const size_t first = size_t(layer) * size_t(config_.kvHeads);
    writer.put(quantized ? kivi_.tokens(layer) : int64_t(-1));
    // Moved positions: a settled layer's (snapkv, pyramidkv); a window policy's layers hold none.
    const bool moved = quantized && !kiviPositions_.empty();
    writer.put(moved ? int64_t(kiviPositions_[first].size()) : int64_t(0));
    for (int32_t h = 0; h < config_.kvHeads; ++h) {
      if (quantized) {
        if (moved) {
          for (const int64_t position : kiviPositions_[first + size_t(h)]) writer.put(position);
        }
        KiviStore::HeadImage image;
        KVSLIM_RETURN_IF_ERROR(kivi_.readHead(layer, h, &image));
        putKiviHead(image, holes, out);
        continue;
      }
      const int64_t kept = store_.keptTokens(layer, h), tail = store_.tailTokens(layer, h);
      writer.put(kept);
      writer.put(tail);
      for (const int64_t position : store_.keptPositions(layer, h)) writer.put(position);
      size_t offset = out->size();
      out->resize(offset + 2 * size_t(kept + tail) * rowBytes);
      KVSLIM_RETURN_IF_ERROR(store_.readKeptRows(layer, h, 0, kept, out->data() + offset, out->data() + offset + size_t(kept) * rowBytes));
      offset += 2 * size_t(kept) * rowBytes;
      KVSLIM_RETURN_IF_ERROR(store_.readRows(layer, h, 0, tail, out->data() + offset, out->data() + offset + size_t(tail) * rowBytes));
    }
  }
  writer.put(xxh64(out->data(), out->size()));
  return Status::ok();
}

Status KVCache::loadEvicting(const uint8_t* data, size_t size, size_t offset, CacheConfig config,
                             std::shared_ptr<Backend> backend, std::unique_ptr<KVCache>* out, bool holes) {
  // The checksum first: everything after it is then as saved, and only bounds need checking.
  if (size < offset + 8) return corrupt("the header is truncated");
  KVSLIM_RETURN_IF_ERROR(checkHash(data, size));
  ByteReader reader(data + offset, size - 8 - offset);
  SelectConfig& s = config.select;
  int32_t ropeStyle = 0, kind = 0, pooling = 0, cachePositions = 0, preRope = 0;
  uint64_t maskBytes = 0, stateBytes = 0;
  bool complete = reader.get(&config.kiviOutliers) && reader.get(&config.rope.theta) && reader.get(&ropeStyle) &&
                  (!holes || reader.get(&preRope)) && reader.get(&kind) && reader.get(&s.sink) && reader.get(&s.window) && reader.get(&s.budget) &&
                  reader.get(&s.kernel) && reader.get(&pooling) && reader.get(&s.beta) && reader.get(&s.recent) &&
                  reader.get(&cachePositions) && reader.get(&maskBytes);
  if (!complete) return corrupt("the header is truncated");
  if (kind < int32_t(SelectKind::Streaming) || kind > int32_t(SelectKind::Duo)) {
    return corrupt("unknown eviction policy kind " + std::to_string(kind));
  }
  if ((pooling != 0 && pooling != 1) || (cachePositions != 0 && cachePositions != 1) || (ropeStyle != 0 && ropeStyle != 1) ||
      (preRope != 0 && preRope != 1)) {
    return corrupt("a policy field is out of range");
  }
  if (!(config.kiviOutliers >= 0.0 && config.kiviOutliers <= 1.0) || !std::isfinite(config.rope.theta) || config.rope.theta < 0.0f) {
    return corrupt("the KIVI outlier fraction or the rope theta is out of range");
  }
  s.kind = SelectKind(kind);
  // Version 7 exactly for window policies over KIVI (their layers hold holes, not moved tokens).
  const bool windowOverKivi = config.storeKind == StoreKind::Kivi && (s.kind == SelectKind::Streaming || s.kind == SelectKind::Duo);
  if (holes != windowOverKivi) {
    return corrupt(holes ? "KIVI holes without a KIVI store and a window policy"
                         : "a window policy over a KIVI store needs save format version 7");
  }
  config.kiviPreRope = preRope == 1;
  s.pooling = Pooling(pooling);
  s.cachePositions = cachePositions == 1;
  config.rope.style = RopeStyle(ropeStyle);
  if (maskBytes != (s.kind == SelectKind::Duo ? uint64_t(config.layers) * uint64_t(config.kvHeads) : 0)) {
    return corrupt("the duo head mask has the wrong size");
  }
  s.retrieval.resize(size_t(maskBytes));
  for (uint8_t& flag : s.retrieval) {
    if (!reader.get(&flag) || flag > 1) return corrupt("the duo head mask is truncated or not 0/1");
  }
  if (!reader.get(&stateBytes) || stateBytes > size) return corrupt("the policy state is truncated");
  const size_t stateOffset = offset + reader.offset();
  if (size - 8 - stateOffset < stateBytes) return corrupt("the policy state is truncated");
  ByteReader payload(data + stateOffset + stateBytes, size - 8 - stateOffset - size_t(stateBytes));

  std::unique_ptr<KVCache> cache;
  const Status created = create(config, std::move(backend), &cache);
  if (created.code() == ErrorCode::Option) return corrupt(created.message());
  KVSLIM_RETURN_IF_ERROR(created);
  const size_t rowBytes = size_t(config.headDim) * dtypeBytes(config.storeType);
  const size_t payloadBase = stateOffset + size_t(stateBytes);
  try {
    std::vector<int64_t> tokens(size_t(config.layers));
    for (int64_t& count : tokens) {
      if (!payload.get(&count) || count < 0 || uint64_t(count) > (uint64_t(1) << 40)) return corrupt("a token count is out of range");
    }
    RestoredStores restored{cache->store_, std::vector<int64_t>(size_t(config.layers), -1)};
    // Positions: distinct, each in [0, end) (end: the first position a later segment holds). Kept
    // slots need not be in order (H2O overwrites slots).
    auto readPositions = [&](int64_t count, int64_t end, std::vector<int64_t>* positions) {
      if (count < 0 || uint64_t(count) > (size - payloadBase) / 8) return false;
      positions->resize(size_t(count));
      for (int64_t& p : *positions) {
        if (!payload.get(&p) || p < 0 || p >= end) return false;
      }
      std::vector<int64_t> sorted = *positions;
      std::sort(sorted.begin(), sorted.end());
      return std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end();
    };
    for (int32_t layer = 0; layer < config.layers; ++layer) {
      const int64_t total = tokens[size_t(layer)];
      int64_t kiviTokens = 0, moved = 0;
      if (!payload.get(&kiviTokens) || !payload.get(&moved)) return corrupt("the payload is truncated");
      const size_t first = size_t(layer) * size_t(config.kvHeads);
      if (kiviTokens >= 0) {
        // A layer in the KIVI store: `moved` tokens at saved positions, then the tokens since.
        if (config.storeKind != StoreKind::Kivi || moved < 0 || moved > kiviTokens || kiviTokens > total) {
          return corrupt("a KIVI layer's token counts are out of range");
        }
        const int64_t offsetTokens = total - kiviTokens;
        // A window policy's layers live in the KIVI store from their first token.
        if (holes && (moved != 0 || offsetTokens != 0)) return corrupt("a window policy's KIVI layer holds moved tokens");
        KiviStore::HeadImage image;
        for (int32_t h = 0; h < config.kvHeads; ++h) {
          if (!holes) {
            std::vector<int64_t>& positions = cache->kiviPositions_[first + size_t(h)];
            if (!readPositions(moved, moved + offsetTokens, &positions)) return corrupt("the kept positions are out of range");
          }
          size_t position = payloadBase + payload.offset();
          KVSLIM_RETURN_IF_ERROR(readKiviHead(data, size - 8, &position, kiviTokens, cache->kivi_, holes, &image));
          payload.skip(position - payloadBase - payload.offset());
          // The hole is the policy's: [sink, at most tokens - window) in a windowed head, none elsewhere.
          int64_t sink = 0, window = 0;
          const bool windowed = holes && cache->policy_->windowOf(layer, h, &sink, &window);
          if (image.hole.size() > 0 && (!windowed || image.hole.begin != sink || image.hole.end > kiviTokens - window)) {
            return corrupt("a KIVI head's hole does not match the policy's window");
          }
          KVSLIM_RETURN_IF_ERROR(cache->kivi_.writeHead(layer, h, kiviTokens, image));
        }
        if (!holes) {
          cache->kiviOffset_[size_t(layer)] = offsetTokens;
          cache->store_.restoreTokens(layer, total);
        }
        restored.kiviTokens[size_t(layer)] = kiviTokens;
        continue;
      }
      if (kiviTokens != -1 || moved != 0 || holes) return corrupt("a layer's token counts are out of range");
      for (int32_t h = 0; h < config.kvHeads; ++h) {
        int64_t kept = 0, tail = 0;
        if (!payload.get(&kept) || !payload.get(&tail) || tail < 0 || tail > total || kept < 0 || kept > total - tail) {
          return corrupt("a head's token counts are out of range");
        }
        std::vector<int64_t> positions;
        if (!readPositions(kept, total - tail, &positions)) return corrupt("the kept positions are out of range");
        const size_t bytes = 2 * size_t(kept + tail) * rowBytes;
        const size_t at = payloadBase + payload.offset();
        if (size - 8 - at < bytes) return corrupt("the payload is truncated");
        const uint8_t* rows = data + at;
        if (!finiteRows(rows, bytes / dtypeBytes(config.storeType), config.storeType)) {
          return corrupt("a stored key or value is not finite");
        }
        KVSLIM_RETURN_IF_ERROR(cache->store_.restoreHead(layer, h, rows, rows + size_t(kept) * rowBytes, std::move(positions),
                                                         rows + 2 * size_t(kept) * rowBytes,
                                                         rows + (2 * size_t(kept) + size_t(tail)) * rowBytes, tail));
        payload.skip(bytes);
      }
      cache->store_.restoreTokens(layer, total);
    }
    if (payload.offset() != size - 8 - payloadBase) return corrupt("the payload has trailing bytes");
    // The policy's state last: it is checked against the restored store.
    KVSLIM_RETURN_IF_ERROR(cache->policy_->loadState(data + stateOffset, size_t(stateBytes), restored, config.layers));
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory in load()");
  }
  *out = std::move(cache);
  return Status::ok();
}

Status KVCache::loadKivi(const uint8_t* data, size_t size, size_t offset, const CacheConfig& config,
                         std::shared_ptr<Backend> backend, std::unique_ptr<KVCache>* out) {
  std::unique_ptr<KVCache> cache;
  const Status created = create(config, std::move(backend), &cache);
  if (created.code() == ErrorCode::Option) return corrupt(created.message());
  KVSLIM_RETURN_IF_ERROR(created);
  const KiviFormat& format = cache->kivi_.shape().format;
  const size_t rowBytes = size_t(config.headDim) * 2;
  ByteReader reader(data + offset, size - offset);
  std::vector<int64_t> tokens(size_t(config.layers));
  for (int64_t& count : tokens) {
    if (!reader.get(&count)) return corrupt("the token counts are truncated");
    if (count < 0 || uint64_t(count) > size) return corrupt("a token count exceeds the buffer");
  }
  // First pass: check every head's counts and sizes (no allocation), then the exact size and hash.
  const size_t payloadStart = offset + reader.offset();
  size_t position = payloadStart;
  auto headBytes = [&](int64_t count, int64_t keys, int64_t values) {
    return size_t(keys / format.group) * format.keyGroupBytes() + size_t(values) * format.valueTokenBytes() +
           size_t(2 * count - keys - values) * rowBytes;
  };
  for (int32_t layer = 0; layer < config.layers; ++layer) {
    const int64_t count = tokens[size_t(layer)];
    int64_t layerKeys = -1, layerValues = -1;
    for (int32_t h = 0; h < config.kvHeads; ++h) {
      int64_t keys = 0, values = 0;
      if (size - position < 16 + 8) return corrupt("the KIVI payload is truncated");
      std::memcpy(&keys, data + position, 8);
      std::memcpy(&values, data + position + 8, 8);
      if (!flushedCounts(cache->kivi_, count, keys, values)) {
        return corrupt("a KIVI head's quantized token counts do not match its token count and residual");
      }
      // Every head of a layer holds the same rows (the kernels rely on one ring size per layer).
      if (h > 0 && (keys != layerKeys || values != layerValues)) return corrupt("the kv heads of a layer disagree");
      layerKeys = keys;
      layerValues = values;
      const size_t bytes = headBytes(count, keys, values);
      if (bytes > size - position - 16 - 8) return corrupt("the KIVI payload is truncated");
      position += 16 + bytes;
    }
  }
  if (position + 8 != size) {
    return corrupt("the buffer holds " + std::to_string(size) + " bytes, but its header describes " +
                   std::to_string(position + 8));
  }
  KVSLIM_RETURN_IF_ERROR(checkHash(data, size));
  try {
    position = payloadStart;
    KiviStore::HeadImage image;
    for (int32_t layer = 0; layer < config.layers; ++layer) {
      const int64_t count = tokens[size_t(layer)];
      for (int32_t h = 0; h < config.kvHeads; ++h) {
        KVSLIM_RETURN_IF_ERROR(readKiviHead(data, size - 8, &position, count, cache->kivi_, false, &image));
        KVSLIM_RETURN_IF_ERROR(cache->kivi_.writeHead(layer, h, count, image));
      }
    }
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory in load()");
  }
  *out = std::move(cache);
  return Status::ok();
}

}  // namespace kvslim
