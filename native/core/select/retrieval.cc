// RetrievalAttention (methods/retrieval-attention.md): the dynamic part is reached through an
// index per (layer, kv head) and each decode call loads the `topK` keys the index returns for the
// group's queries (one search per kv head; a key scores by its best query row).
// - flat: exact top-k, scanned by the backend from the pages (SIMD on the CPU; on the GPU the
//   scan, the best row per key and the top-k run there, one call for every kv head);
// - ivf, graph: a KeyIndex in host memory with a copy of the keys (f16 over an f16 store, exactly its
//   values; else f32). The graph is trained on a sample of the prefill queries (the attention-aware
//   index); keys that leave the window later are inserted incrementally.
// - Forks share the indexes copy-on-write: a search only reads one, and a policy copies an index
//   that another fork still holds before it adds keys (a fork of a long context costs nothing
//   until it appends, instead of a deep copy of every index).
#include <algorithm>
#include <memory>
#include <thread>

#include "loading_policy.h"

namespace kvslim {

namespace {

class RetrievalPolicy final : public LoadingPolicy {
 public:
  RetrievalPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads)
      : LoadingPolicy(config.sink, config.window, layers, kvHeads),
        options_(config.index),
        topK_(config.topK),
        trainQueries_(config.trainQueries),
        indexes_(size_t(layers) * size_t(kvHeads)) {}

  // A fork shares the indexes (copy-on-write).
  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<RetrievalPolicy>(*this); }

  // State (ivf, graph; flat has none): the index extents, then per (layer, kv head) u8 1 and the
  // index's size (i64) and structure (counted bytes) where it has an index, else u8 0. Its keys
  // are the store's, read back on load: the loaded index searches and grows as this one would,
  // where rebuilding it would lose the graph's training queries and the ivf's first centroids.
  Status saveState(int32_t, std::vector<uint8_t>* out) const override {
    if (options_.kind == IndexKind::Flat) return Status::ok();
    ByteWriter writer(out);
    saveIndexed(&writer);
    std::vector<uint8_t> structure;
    for (const std::shared_ptr<KeyIndex>& index : indexes_) {
      writer.put(uint8_t(index ? 1 : 0));
      if (!index) continue;
      structure.clear();
      index->saveStructure(&structure);
      writer.put(index->size());
      writer.putArray(structure);
    }
    return Status::ok();
  }

  Status loadState(const uint8_t* data, size_t size, const RestoredStores& restored, int32_t layers) override {
    const auto corrupt = [](const std::string& what) { return Status(ErrorCode::Corrupt, "cannot load cache: " + what); };
    if (options_.kind == IndexKind::Flat) return size == 0 ? Status::ok() : corrupt("unexpected policy state");
    ByteReader reader(data, size);
    KVSLIM_RETURN_IF_ERROR(loadIndexed(&reader, restored));
    std::vector<std::shared_ptr<KeyIndex>> indexes(indexes_.size());
    std::vector<uint8_t> structure;
    std::vector<float> keys;
    for (size_t i = 0; i < indexes.size(); ++i) {
      const int32_t layer = int32_t(i / size_t(kvHeads_)), h = int32_t(i % size_t(kvHeads_));
      const int64_t indexed = indexed_[i] - sink_;
      uint8_t present = 0;
      int64_t count = 0;
      if (!reader.get(&present) || present > 1) return corrupt("the retrieval state is truncated");
      // A head reaches past its sinks only through its index (an index may be empty: a failed build).
      if (present == 0) {
        if (indexed != 0) return corrupt("a retrieval head lacks its index");
        continue;
      }
      if (!reader.get(&count) || count != indexed || !reader.getArrayUpTo(&structure, size - reader.offset())) {
        return corrupt("a retrieval index does not match its head");
      }
      keys.clear();
      KVSLIM_RETURN_IF_ERROR(readKeys(restored.store, layer, h, sink_, count, &keys));
      std::unique_ptr<KeyIndex> index;
      KVSLIM_RETURN_IF_ERROR(makeKeyIndex(indexOptions(restored.store, restored.threads), &index));
      KVSLIM_RETURN_IF_ERROR(index->restore(keys.data(), count, structure.data(), structure.size()));
      indexes[i] = std::move(index);
    }
    if (!reader.done()) return corrupt("the retrieval state has trailing bytes");
    indexes_ = std::move(indexes);
    return Status::ok();
  }

  size_t indexBytes() const override {
    size_t bytes = 0;
    for (const auto& index : indexes_) bytes += index ? index->bytes() : 0;
    return bytes;
  }

 protected:
  bool needsKeys() const override { return options_.kind != IndexKind::Flat; }
  bool hostOnly() const override { return options_.kind != IndexKind::Flat; }  // flat scans on the backend

  Status index(SelectContext& context, int32_t layer, int32_t h, int64_t, int64_t count, const std::vector<float>& keys,
               const float* q, int64_t n) override {
    if (options_.kind == IndexKind::Flat) return Status::ok();  // the backend scans the pages
    std::shared_ptr<KeyIndex>& index = indexes_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
    if (index && index->size() > 0) {
      if (index.use_count() > 1) index = index->clone();  // another fork still reads it
      return index->add(keys.data(), count);
    }
    std::unique_ptr<KeyIndex> created;
    KVSLIM_RETURN_IF_ERROR(makeKeyIndex(indexOptions(context.store, context.threads), &created));
    index = std::move(created);
    // Training queries: an even sample of the prefill call's query rows of this kv head's group.
    std::vector<float> training;
    if (q != nullptr && n > 0) {
      const std::vector<float> rows = groupRows(q, n, context.qHeads, context.kvHeads, h, context.headDim);
      const int64_t available = int64_t(rows.size() / size_t(context.headDim));
      const int64_t take = std::min(available, trainQueries_);
      const size_t dim = size_t(context.headDim);
      for (int64_t i = 0; i < take; ++i) {
        const int64_t row = i * available / take;
        training.insert(training.end(), rows.begin() + row * dim, rows.begin() + (row + 1) * dim);
      }
    }
    return index->build(keys.data(), count, training.empty() ? nullptr : training.data(),
                        int64_t(training.size() / size_t(context.headDim)));
  }

  // flat: one backend call scans every kv head's dynamic keys (a key scores by its best query row)
  // and returns their top keys; the indexes search per kv head (choose).
  Status chooseLayer(SelectContext& context, int32_t layer, const float* q, int64_t n, int64_t dynamicEnd, LoadPlan* plan) override {
    if (options_.kind != IndexKind::Flat) return LoadingPolicy::chooseLayer(context, layer, q, n, dynamicEnd, plan);
    std::vector<float> rows;
    TopKeysArgs args;
    KVSLIM_RETURN_IF_ERROR(layerRows(context, q, n, &rows, &args.rows));
    std::vector<KVHeadView> views(static_cast<size_t>(kvHeads_));
    for (int32_t h = 0; h < kvHeads_; ++h) views[size_t(h)] = context.store.tailRange(layer, h, sink_, dynamicEnd - sink_);
    args.q = rows.data();
    args.kvHeads = kvHeads_;
    args.headDim = context.headDim;
    args.kvType = context.store.shape().storeType;
    args.pageTokens = context.store.shape().pageTokens;
    args.rowStride = context.headDim;
    args.heads = views.data();
    args.k = std::min(topK_, dynamicEnd - sink_);
    std::vector<int64_t> chosen(size_t(kvHeads_) * size_t(args.k));
    args.out = chosen.data();
    args.threads = context.threads;
    KVSLIM_RETURN_IF_ERROR(context.backend.topKeys(args));
    for (int32_t h = 0; h < kvHeads_; ++h) {
      for (int64_t i = 0; i < args.k; ++i) {
        const int64_t token = chosen[size_t(h) * size_t(args.k) + size_t(i)];
        if (token < 0) break;
        if (token >= views[size_t(h)].tokens) return Status(ErrorCode::Internal, "retrieval: the backend chose a key past the scan");
        plan->tokens[size_t(h)].push_back(sink_ + token);
      }
    }
    return Status::ok();
  }

  Status choose(SelectContext& context, int32_t layer, int32_t h, const std::vector<float>& rows, int64_t, std::vector<int64_t>* tokens) override {
    const int32_t rowCount = int32_t(rows.size() / size_t(context.headDim));
    SearchResult result;
    KVSLIM_RETURN_IF_ERROR(indexes_[size_t(layer) * size_t(kvHeads_) + size_t(h)]->search(rows.data(), rowCount, topK_, {}, &result));
    for (const uint32_t id : result.ids) tokens->push_back(sink_ + int64_t(id));
    std::sort(tokens->begin(), tokens->end());
    return Status::ok();
  }

 private:
  // The options of one head's index: each build gets its share of the threads (the kv heads build
  // in parallel already, and nested threads oversubscribe the cores); keys read from an f16 store
  // are f16 values, which the index keeps so, exactly, in half the bytes.
  IndexOptions indexOptions(const PagedStore& store, int32_t threads) const {
    IndexOptions options = options_;
    options.dim = store.shape().headDim;
    const int32_t available = threads > 0 ? threads : int32_t(std::max(1u, std::thread::hardware_concurrency()));
    options.threads = std::max(1, available / kvHeads_);
    options.halfKeys = store.shape().storeType == DType::F16;
    return options;
  }

  IndexOptions options_;
  int64_t topK_, trainQueries_;
  std::vector<std::shared_ptr<KeyIndex>> indexes_;  // [layers * kvHeads]; empty for flat; shared by forks
};

}  // namespace

std::unique_ptr<SelectPolicy> makeRetrievalPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads) {
  return std::make_unique<RetrievalPolicy>(config, layers, kvHeads);
}

}  // namespace kvslim
