// ActQKV (methods/actqkv.md): the dynamic part in blocks of `blockSize` tokens, one representative
// key per block and kv head; an activation-aware probe-query built from the layer's last
// `queryWindow` queries (queries with outlier features weigh more) scores the blocks by cosine,
// plus `questionWeight` x the cosine with the call's own query; the entropy of the block scores
// shares a budget of blocks x layers blocks per decode step across the layers.
//
// Engine choices (the spec's "(R)" items):
// - Statistics, the query ring and the entropy history live per layer and per policy object, so
//   they reset with each cache (the reference code keeps them as process-wide globals).
// - Every query enters the layer's ring of the last c = queryWindow queries: prefill queries in
//   afterAppend(prefill), decode queries in planLoad (which every decode attend call reaches, step()
//   and attend() alike; afterAppend of a step does not add them again). A window completes every c
//   queries (across calls) and updates mu, s2 with the spec's formulas; the first window
//   initialises them (s2 = unbiased variance, as the code does).
// - The ring takes the call's queries before the index catches up and before the choice, so the
//   probe covers the current window as it does in prefill.
// - Weighting starts after kWarmupWindows windows (the code's 1000 would keep it off for any real
//   session); before that, and whenever the biases sum to 0, the weights are uniform.
// - Representatives are kept per kv head: the mean of the reprTopK keys of the block that scored
//   highest against the probe when they were indexed (sum over the group's probes of p.k), a
//   stand-in for the accumulated local-window attention we do not compute.
// - Policy arithmetic is double precision: the choices sit on top-k boundaries, where f32
//   rounding would flip near ties.
// - Where things run: the query statistics, the probe, the candidates of the filling block and
//   the representatives' construction are host work, O(qHeads * headDim) per decode call. The
//   representatives themselves live in backend memory (one growable buffer per layer and kv head,
//   shared copy-on-write with forks, as Quest's boxes), and the per-call work that grows with the
//   context, scoring O(N_b * headDim) per kv head, the entropies and the top blocks, runs as the
//   backend's blockScores and topBlocks ops (block_scores_args.h): a GPU cache sends u and the
//   newest block's representative up and gets kvHeads entropies and k block indices per head back.
//   A block's representative is uploaded once its block is final; the newest one travels with
//   each scoring call.
// - Per decode call the probe costs O(qHeads * headDim), not O(c * qHeads * headDim): each ring
//   slot keeps its bias b_i, and the layer keeps sum_i b_i x_i and sum_i b_i, updated as a query
//   enters and the oldest leaves; both are rebuilt from the ring whenever the statistics change
//   (every c queries), which also bounds the rounding drift of the running sums.
// - Block norms are kept with the representatives, and a representative is recomputed once per
//   index() call for the blocks whose best keys changed, not once per key.
// - Statistics, the probe and the ring are per layer and settled before the kv heads index and
//   score their blocks in parallel (per-head state only).
#include <algorithm>
#include <climits>
#include <cmath>
#include <memory>
#include <numeric>

#include "../backend.h"
#include "../tensor_convert.h"
#include "../vector_ops.h"
#include "loading_policy.h"

namespace kvslim {

namespace {

constexpr int64_t kWarmupWindows = 4;  // deviation from the code's 1000 (see above)
constexpr double kCountCap = 1000;     // n, the windows the running statistics weigh, is capped
constexpr size_t kHistory = 100;       // entropy samples kept per layer
constexpr int64_t kBlockGranule = 64;  // representatives are allocated in steps of this many blocks
constexpr int64_t kMaxSavedCount = int64_t(1) << 50;  // bound on loaded query counts and budgets (no overflow later)

// One kv head's final representatives in backend memory: reprs [capacity, headDim] in the store's
// dtype (as the reference code keeps them in the model's), then norms [capacity] doubles. The
// backend outlives it (kv_cache.h declares backend_ before policy_).
class ReprBuffer {
 public:
  ReprBuffer(Backend& backend, int32_t dim, DType type) : memory_(backend), dim_(dim), type_(type) {}
  Status allocate(int64_t capacity) {
    KVSLIM_RETURN_IF_ERROR(memory_.allocate(normsOffset(capacity) + size_t(capacity) * sizeof(double), "ActQKV block representatives"));
    capacity_ = capacity;
    return Status::ok();
  }
  // Row `block` of the representatives.
  uint8_t* repr(int64_t block) const { return static_cast<uint8_t*>(memory_.data()) + size_t(block) * rowBytes(); }
  double* norms() const { return reinterpret_cast<double*>(static_cast<char*>(memory_.data()) + normsOffset(capacity_)); }
  int64_t capacity() const { return capacity_; }
  size_t rowBytes() const { return size_t(dim_) * dtypeBytes(type_); }
  // Representatives [0, count) as f32 values (appended) and their norms, read back (save()).
  Status read(int64_t count, std::vector<float>* reprs, std::vector<double>* norms) const {
    std::vector<uint8_t> rows(size_t(count) * rowBytes());
    norms->resize(size_t(count));
    if (count == 0) return Status::ok();
    KVSLIM_RETURN_IF_ERROR(memory_.download(rows.data(), 0, rows.size()));
    KVSLIM_RETURN_IF_ERROR(memory_.download(norms->data(), normsOffset(capacity_), norms->size() * sizeof(double)));
    for (size_t i = 0; i < size_t(count) * size_t(dim_); ++i) reprs->push_back(loadElement(rows.data(), type_, i));
    return Status::ok();
  }

 private:
  size_t normsOffset(int64_t capacity) const { return (size_t(capacity) * rowBytes() + 7) / 8 * 8; }
  BackendBuffer memory_;
  int32_t dim_;
  DType type_;
  int64_t capacity_ = 0;
};

// The per-call block scores in backend memory, [kvHeads, blocks] doubles; each policy object has
// its own (a copy starts without one: forks may run at the same time).
class ScoreScratch {
 public:
  ScoreScratch() = default;
  ScoreScratch(const ScoreScratch&) {}
  ScoreScratch& operator=(const ScoreScratch&) { return *this; }
  Status reserve(Backend& backend, size_t count, double** out) {
    if (!buffer_ || capacity_ < count) {
      const size_t grown = std::max(count, capacity_ + capacity_ / 2);
      buffer_ = std::make_unique<BackendBuffer>(backend);
      capacity_ = 0;
      KVSLIM_RETURN_IF_ERROR(buffer_->allocate(grown * sizeof(double), "ActQKV block scores"));
      capacity_ = grown;
    }
    *out = static_cast<double*>(buffer_->data());
    return Status::ok();
  }

 private:
  std::unique_ptr<BackendBuffer> buffer_;
  size_t capacity_ = 0;
};

class ActQKVPolicy final : public LoadingPolicy {
 public:
  ActQKVPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, int32_t headDim)
      : LoadingPolicy(config.sink, config.window, layers, kvHeads),
        layers_(layers),
        blockSize_(config.blockSize),
        blocks_(config.blocks),
        reprTopK_(config.reprTopK),
        queryWindow_(config.queryWindow),
        questionWeight_(config.questionWeight),
        temperature_(config.temperature),
        // The Llama config's lower bound, 32 of 46 blocks, scaled to `blocks`.
        lower_((config.blocks * 32 + 45) / 46),
        queries_(size_t(layers)),
        heads_(size_t(layers) * size_t(kvHeads)),
        history_(size_t(layers)),
        dim_(headDim) {}

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<ActQKVPolicy>(*this); }

  size_t indexBytes() const override {
    size_t bytes = 0;
    for (const std::shared_ptr<HeadBlocks>& shared : heads_) {
      if (!shared) continue;
      const HeadBlocks& head = *shared;
      // Every started block has a representative (the newest on the host until it is final).
      bytes += size_t(head.blocks) * (size_t(dim_) * dtypeBytes(reprType_) + sizeof(double)) + head.candKeys.size() * sizeof(float) +
               head.candScores.size() * (sizeof(double) + sizeof(int64_t));
    }
    for (const LayerQueries& layer : queries_) {
      bytes += layer.ring.size() * sizeof(float) +
               (layer.mu.size() + layer.s2.size() + layer.probe.size() + layer.bias.size() + layer.weighted.size()) * sizeof(double);
    }
    for (const auto& samples : history_) bytes += samples.size() * sizeof(double);
    return bytes;
  }

  // State: the index extents; per layer its query state (ring, counts, statistics, running sums,
  // probe) and entropy history; per (layer, kv head) u8 1 and its blocks (count, the final
  // representatives as f32 values and their norms, the newest one, its candidate keys) where it has
  // indexed, else u8 0; then the step's layer and remaining budget. Arrays are counted. Everything
  // the next call reads is here, so a loaded cache chooses as this one would (a rebuild would
  // start from fresh statistics and a zero probe).
  Status saveState(int32_t, std::vector<uint8_t>* out) const override {
    ByteWriter writer(out);
    saveIndexed(&writer);
    for (size_t layer = 0; layer < queries_.size(); ++layer) {
      const LayerQueries& lq = queries_[layer];
      writer.putArray(lq.ring);
      for (const int64_t value : {lq.count, lq.pending, lq.windows}) writer.put(value);
      writer.putArray(lq.mu);
      writer.putArray(lq.s2);
      writer.put(lq.s2Floor);
      writer.putArray(lq.bias);
      writer.putArray(lq.weighted);
      writer.put(lq.biasTotal);
      writer.put(lq.sumsWindows);
      writer.putArray(lq.probe);
      writer.put(uint8_t(lq.probeValid ? 1 : 0));
      writer.putArray(history_[layer]);
    }
    std::vector<float> reprs;
    std::vector<double> norms;
    for (const std::shared_ptr<HeadBlocks>& shared : heads_) {
      writer.put(uint8_t(shared ? 1 : 0));
      if (!shared) continue;
      const HeadBlocks& head = *shared;
      reprs.clear();
      if (head.buffer) KVSLIM_RETURN_IF_ERROR(head.buffer->read(head.stored, &reprs, &norms));
      else norms.clear();
      reprs.insert(reprs.end(), head.staged.begin(), head.staged.end());
      norms.insert(norms.end(), head.stagedNorms.begin(), head.stagedNorms.end());
      writer.put(head.blocks);
      writer.putArray(reprs);
      writer.putArray(norms);
      writer.putArray(head.last);
      writer.put(head.lastNorm);
      writer.putArray(head.candScores);
      writer.putArray(head.candKeys);
      writer.putArray(head.candPositions);
    }
    writer.put(lastLayer_);
    writer.put(remaining_);
    return Status::ok();
  }

  // Checks every count and extent against the restored store and this policy's options, and
  // every value that was a key, a query or a representative for finiteness; representatives go
  // back as staged ones (the next call uploads them).
  Status loadState(const uint8_t* data, size_t size, const RestoredStores& restored, int32_t layers) override {
    const auto corrupt = [](const std::string& what) { return Status(ErrorCode::Corrupt, "cannot load cache: the actqkv " + what); };
    const size_t dim = size_t(dim_);
    const size_t width = size_t(restored.qHeads) * dim;
    const DType type = restored.store.shape().storeType;
    const auto finite = [](const auto& values) {
      for (const auto value : values)
        if (!std::isfinite(value)) return false;
      return true;
    };
    // Representatives and the newest one are the store dtype's numbers (represent() rounds them).
    const auto representable = [type](const std::vector<float>& values) {
      for (const float value : values) {
        uint8_t element[4];
        storeElement(element, type, 0, value);
        if (!std::isfinite(value) || loadElement(element, type, 0) != value) return false;
      }
      return true;
    };
    ByteReader reader(data, size);
    KVSLIM_RETURN_IF_ERROR(loadIndexed(&reader, restored));
    std::vector<LayerQueries> queries(queries_.size());
    std::vector<std::vector<double>> history(history_.size());
    for (size_t layer = 0; layer < queries.size(); ++layer) {
      LayerQueries& lq = queries[layer];
      const uint64_t ringFloats = uint64_t(queryWindow_) * width;
      uint8_t probeValid = 0;
      if (!reader.getArrayUpTo(&lq.ring, ringFloats) || !reader.get(&lq.count) || !reader.get(&lq.pending) || !reader.get(&lq.windows) ||
          !reader.getArrayUpTo(&lq.mu, width) || !reader.getArrayUpTo(&lq.s2, width) || !reader.get(&lq.s2Floor) ||
          !reader.getArrayUpTo(&lq.bias, uint64_t(queryWindow_)) || !reader.getArrayUpTo(&lq.weighted, width) ||
          !reader.get(&lq.biasTotal) || !reader.get(&lq.sumsWindows) || !reader.getArrayUpTo(&lq.probe, width) ||
          !reader.get(&probeValid) || !reader.getArrayUpTo(&history[layer], kHistory)) {
        return corrupt("query state is truncated or too long");
      }
      // Windows complete every queryWindow queries; the running sums and the probe are whole or absent.
      const bool counts = lq.count >= 0 && lq.count <= kMaxSavedCount && lq.pending == lq.count % queryWindow_ &&
                          lq.windows == lq.count / queryWindow_;
      const bool sizes = (lq.ring.empty() ? lq.count == 0 : lq.ring.size() == ringFloats) &&
                         lq.mu.size() == (lq.windows > 0 ? width : 0) && lq.s2.size() == lq.mu.size() &&
                         (lq.sumsWindows == -1 ? lq.bias.empty() && lq.weighted.empty()
                                               : lq.sumsWindows >= 0 && lq.sumsWindows <= lq.windows &&
                                                     lq.bias.size() == uint64_t(queryWindow_) && lq.weighted.size() == width) &&
                         (lq.probe.empty() || lq.probe.size() == width) && probeValid <= 1 && (probeValid == 0 || !lq.probe.empty());
      if (!counts || !sizes) return corrupt("query state is inconsistent");
      if (!finite(lq.ring) || !finite(lq.mu) || !finite(lq.s2) || !std::isfinite(lq.s2Floor) || !finite(lq.probe) || !finite(history[layer])) {
        return corrupt("query state is not finite");
      }
      lq.probeValid = probeValid == 1;
    }
    std::vector<std::shared_ptr<HeadBlocks>> heads(heads_.size());
    for (size_t i = 0; i < heads.size(); ++i) {
      const int64_t indexed = indexed_[i];
      uint8_t present = 0;
      if (!reader.get(&present) || present > 1) return corrupt("block state is truncated");
      // index() gives a head its blocks with its first key.
      if (present != (indexed > sink_ ? 1 : 0)) return corrupt("block state does not match the index extent");
      if (present == 0) continue;
      auto head = std::make_shared<HeadBlocks>();
      const int64_t blocks = (indexed - sink_ + blockSize_ - 1) / blockSize_;
      const int64_t newest = sink_ + (blocks - 1) * blockSize_;  // the newest block's first position
      const uint64_t maxCandidates = uint64_t(std::min<int64_t>(reprTopK_, indexed - newest));
      if (!reader.get(&head->blocks) || head->blocks != blocks || !reader.getArray(&head->staged, uint64_t(blocks - 1) * dim) ||
          !reader.getArray(&head->stagedNorms, uint64_t(blocks - 1)) || !reader.getArray(&head->last, dim) || !reader.get(&head->lastNorm) ||
          !reader.getArrayUpTo(&head->candScores, maxCandidates) || head->candScores.empty() ||
          !reader.getArray(&head->candKeys, head->candScores.size() * dim) || !reader.getArray(&head->candPositions, head->candScores.size())) {
        return corrupt("block state does not match its head");
      }
      std::vector<int64_t> positions = head->candPositions;
      std::sort(positions.begin(), positions.end());
      if (positions.front() < newest || positions.back() >= indexed || std::adjacent_find(positions.begin(), positions.end()) != positions.end()) {
        return corrupt("candidate positions are out of range");
      }
      bool norms = std::isfinite(head->lastNorm) && head->lastNorm >= 0;
      for (const double norm : head->stagedNorms) norms = norms && std::isfinite(norm) && norm >= 0;
      if (!norms || !representable(head->staged) || !representable(head->last) || !finite(head->candKeys) || !finite(head->candScores)) {
        return corrupt("block representatives or candidates are not finite");
      }
      heads[i] = std::move(head);
    }
    int32_t lastLayer = 0;
    int64_t remaining = 0;
    if (!reader.get(&lastLayer) || !reader.get(&remaining) || !reader.done()) return corrupt("state is truncated or too long");
    if (lastLayer != INT32_MAX && (lastLayer < 0 || lastLayer >= layers)) return corrupt("step layer is out of range");
    if (remaining < -kMaxSavedCount || remaining > kMaxSavedCount) return corrupt("step budget is out of range");
    queries_ = std::move(queries);
    history_ = std::move(history);
    heads_ = std::move(heads);
    lastLayer_ = lastLayer;
    remaining_ = remaining;
    reprType_ = type;
    return Status::ok();
  }

  Status afterAppend(SelectContext& context, int32_t layer, const float* q, int64_t n, bool prefill) override {
    reprType_ = context.store.shape().storeType;  // before index() runs on the heads' tasks
    if (prefill && q != nullptr) push(context, layer, q, n);
    probeOf(context, layer);  // index() reads it from the heads' parallel tasks
    KVSLIM_RETURN_IF_ERROR(catchUp(context, layer, nullptr, 0));
    return store(context, layer);
  }

  Status planLoad(SelectContext& context, int32_t layer, const float* q, int64_t n, LoadPlan* plan) override {
    // A layer at or below the previous call's starts a new decode step with a fresh budget.
    if (layer <= lastLayer_) remaining_ = blocks_ * int64_t(layers_);
    lastLayer_ = layer;
    reprType_ = context.store.shape().storeType;
    push(context, layer, q, n);
    const std::vector<double>& probe = probeOf(context, layer);
    KVSLIM_RETURN_IF_ERROR(catchUp(context, layer, nullptr, 0));
    KVSLIM_RETURN_IF_ERROR(store(context, layer));
    plan->sink = sink_;
    plan->window = window_;
    plan->tokens.assign(size_t(kvHeads_), {});
    if (context.store.tokens(layer) <= sink_ + window_) return Status::ok();
    const int64_t end = dynamicEnd(context, layer);
    const int64_t blocks = (end - sink_ + blockSize_ - 1) / blockSize_;

    // Block scores and entropies of every kv head on the backend, then the layer's normalised
    // entropy (mean over kv heads, summed in head order).
    const size_t dim = size_t(context.headDim);
    std::vector<double> u(size_t(kvHeads_) * dim, 0.0);
    std::vector<BlockHeadView> views(static_cast<size_t>(kvHeads_));
    const float* lastQuery = q + size_t(n - 1) * size_t(context.qHeads) * dim;
    for (int32_t h = 0; h < kvHeads_; ++h) {
      const HeadBlocks* head = heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)].get();
      if (head == nullptr || head->blocks != blocks || head->stored != blocks - 1) {
        return Status(ErrorCode::Internal, "actqkv: kv head " + std::to_string(h) + " has not indexed the " + std::to_string(blocks) + " blocks it scores");
      }
      scoreVector(context, h, probe, lastQuery, u.data() + size_t(h) * dim);
      BlockHeadView& view = views[size_t(h)];
      view.reprs = head->buffer ? head->buffer->repr(0) : nullptr;
      view.norms = head->buffer ? head->buffer->norms() : nullptr;
      view.stored = head->stored;
      view.newest = head->last.data();  // the newest block's representative is still on the host
      view.newestNorm = head->lastNorm;
    }
    BlockScoresArgs args;
    args.kvHeads = kvHeads_;
    args.headDim = context.headDim;
    args.blocks = blocks;
    args.reprType = reprType_;
    args.heads = views.data();
    args.u = u.data();
    args.temperature = temperature_;
    std::vector<double> entropies(static_cast<size_t>(kvHeads_), 0.0);
    args.entropies = entropies.data();
    args.threads = context.threads;
    KVSLIM_RETURN_IF_ERROR(scores_.reserve(context.backend, size_t(kvHeads_) * size_t(blocks), &args.scores));
    KVSLIM_RETURN_IF_ERROR(context.backend.blockScores(args));
    double entropy = 0;
    for (const double e : entropies) entropy += e;
    std::vector<double>& samples = history_[size_t(layer)];
    samples.push_back(entropy / kvHeads_);
    if (samples.size() > kHistory) samples.erase(samples.begin());

    const int64_t k = allocate(layer, blocks);
    remaining_ -= k;
    std::vector<int64_t> chosen(size_t(kvHeads_) * size_t(k));
    TopBlocksArgs top;
    top.kvHeads = kvHeads_;
    top.blocks = blocks;
    top.scores = args.scores;
    top.k = k;
    top.out = chosen.data();
    top.threads = context.threads;
    KVSLIM_RETURN_IF_ERROR(context.backend.topBlocks(top));
    for (int32_t h = 0; h < kvHeads_; ++h) {
      std::vector<int64_t>& tokens = plan->tokens[size_t(h)];
      for (int64_t i = 0; i < k; ++i) {
        const int64_t begin = sink_ + chosen[size_t(h) * size_t(k) + size_t(i)] * blockSize_;
        for (int64_t t = begin; t < std::min(begin + blockSize_, end); ++t) tokens.push_back(t);
      }
    }
    return Status::ok();
  }

 protected:
  Status index(SelectContext& context, int32_t layer, int32_t h, int64_t first, int64_t count, const std::vector<float>& keys,
               const float*, int64_t) override {
    std::shared_ptr<HeadBlocks>& slot = heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
    // Shared with forks until one of them indexes more keys (copy-on-write).
    if (!slot) slot = std::make_shared<HeadBlocks>();
    else if (slot.use_count() > 1) slot = std::make_shared<HeadBlocks>(*slot);
    HeadBlocks& head = *slot;
    const size_t dim = size_t(context.headDim);
    const int32_t group = context.qHeads / context.kvHeads;
    // A key's score: the sum over the group's probes of p.k = (sum of the probes).k. The probe
    // was settled before the heads ran (afterAppend, planLoad).
    const std::vector<double>& probe = queries_[size_t(layer)].probe;
    if (probe.size() != size_t(context.qHeads) * dim) return Status(ErrorCode::Internal, "actqkv indexed a layer before its probe");
    std::vector<double> sum(dim, 0.0);
    for (int32_t g = 0; g < group; ++g) {
      const double* p = probe.data() + (size_t(h) * size_t(group) + size_t(g)) * dim;
      for (size_t t = 0; t < dim; ++t) sum[t] += p[t];
    }
    std::vector<double> scores(static_cast<size_t>(count));
    hostVectorOps().dotsF64(sum.data(), int32_t(dim), keys.data(), count, scores.data());
    bool changed = false;  // the last block's best keys changed since its representative was made
    for (int64_t i = 0; i < count; ++i) {
      const int64_t position = first + i;
      const int64_t block = (position - sink_) / blockSize_;
      if (block == head.blocks) {  // this key starts a block: the newest one's representative is final
        if (changed) represent(&head, dim, reprType_);
        changed = false;
        if (head.blocks > 0) {
          head.staged.insert(head.staged.end(), head.last.begin(), head.last.end());
          head.stagedNorms.push_back(head.lastNorm);
        }
        ++head.blocks;
        head.last.assign(dim, 0.0f);
        head.lastNorm = 0;
        head.candKeys.clear();
        head.candScores.clear();
        head.candPositions.clear();
      }
      const float* key = keys.data() + size_t(i) * dim;
      const double score = scores[size_t(i)];
      // Keep the block's reprTopK best keys (score descending, ties to the earlier key).
      size_t slot = head.candScores.size();
      if (slot == size_t(reprTopK_)) {
        slot = 0;
        for (size_t c = 1; c < head.candScores.size(); ++c) {
          if (head.candScores[c] < head.candScores[slot] ||
              (head.candScores[c] == head.candScores[slot] && head.candPositions[c] > head.candPositions[slot])) {
            slot = c;
          }
        }
        if (!(score > head.candScores[slot])) continue;
      } else {
        head.candKeys.resize(head.candKeys.size() + dim);
        head.candScores.push_back(0);
        head.candPositions.push_back(0);
      }
      std::copy(key, key + dim, head.candKeys.begin() + slot * dim);
      head.candScores[slot] = score;
      head.candPositions[slot] = position;
      changed = true;
    }
    if (changed) represent(&head, dim, reprType_);
    return Status::ok();
  }

  // planLoad is overridden (the cut-off needs every kv head of the layer); nothing calls this.
  Status choose(SelectContext&, int32_t, int32_t, const std::vector<float>&, int64_t, std::vector<int64_t>*) override {
    return Status(ErrorCode::Internal, "actqkv chooses per layer in planLoad");
  }

 private:
  struct LayerQueries {
    std::vector<float> ring;  // [queryWindow, qHeads * headDim], circular; allocated on first use
    int64_t count = 0;        // queries ever added
    int64_t pending = 0;      // queries since the last complete window
    int64_t windows = 0;      // complete windows seen
    std::vector<double> mu, s2;  // [qHeads * headDim]; empty before the first window
    double s2Floor = 0;          // mean(s2) / 100, the bias denominator's floor
    // The running sums of the probe: bias[slot] of each ring row (1 while unweighted),
    // weighted = sum_i bias_i x_i and biasTotal = sum_i bias_i over the ring, valid while
    // sumsWindows == windows (the statistics they were computed with).
    std::vector<double> bias;      // [queryWindow]
    std::vector<double> weighted;  // [qHeads * headDim]
    double biasTotal = 0;
    int64_t sumsWindows = -1;
    std::vector<double> probe;  // [qHeads, headDim]
    bool probeValid = false;
  };
  struct HeadBlocks {
    int64_t blocks = 0;  // blocks started; the newest may still fill
    // Representatives of blocks [0, stored) are in buffer (backend memory, shared with forks until
    // one of them writes); final ones of blocks [stored, blocks - 1) wait in staged for store().
    std::shared_ptr<ReprBuffer> buffer;
    int64_t stored = 0;
    std::vector<float> staged;        // [blocks - 1 - stored, headDim]
    std::vector<double> stagedNorms;  // [blocks - 1 - stored]
    // The newest block's representative and |representative|, host memory.
    std::vector<float> last;
    double lastNorm = 0;
    // The newest block's best keys so far: keys [<= reprTopK, headDim], their scores and positions.
    std::vector<float> candKeys;
    std::vector<double> candScores;
    std::vector<int64_t> candPositions;
  };

  // The ring's queries, oldest first.
  std::vector<const float*> ringRows(const LayerQueries& lq, size_t width) const {
    const int64_t rows = std::min(lq.count, queryWindow_);
    const int64_t start = lq.count >= queryWindow_ ? lq.count % queryWindow_ : 0;
    std::vector<const float*> out(static_cast<size_t>(rows));
    for (int64_t k = 0; k < rows; ++k) out[size_t(k)] = lq.ring.data() + size_t((start + k) % queryWindow_) * width;
    return out;
  }

  void push(const SelectContext& context, int32_t layer, const float* q, int64_t n) {
    LayerQueries& lq = queries_[size_t(layer)];
    const size_t width = size_t(context.qHeads) * size_t(context.headDim);
    if (lq.ring.empty()) lq.ring.assign(size_t(queryWindow_) * width, 0.0f);
    // Every query passes through the ring, so each run of c consecutive queries (also inside one
    // long prefill, or spanning calls) completes a window and updates the statistics.
    for (int64_t i = 0; i < n; ++i) {
      const float* row = q + size_t(i) * width;
      const size_t slot = size_t(lq.count % queryWindow_);
      float* into = lq.ring.data() + slot * width;
      if (lq.sumsWindows == lq.windows) {  // the sums are current: the oldest row leaves, this one enters
        if (lq.count >= queryWindow_) addRow(&lq, into, -lq.bias[slot], width);
        lq.bias[slot] = biasOf(lq, row, width);
        addRow(&lq, row, lq.bias[slot], width);
      }
      std::copy(row, row + width, into);
      ++lq.count;
      if (++lq.pending == queryWindow_) {
        lq.pending = 0;
        updateStatistics(&lq, width);
      }
    }
    lq.probeValid = false;
  }

  // The spec's running per-feature mean and variance over windows (the ring holds exactly the
  // window that just completed).
  void updateStatistics(LayerQueries* lq, size_t width) const {
    const int64_t c = queryWindow_;
    const double cd = double(c);
    const bool first = lq->windows == 0;
    if (first) {
      lq->mu.assign(width, 0.0);
      lq->s2.assign(width, 0.0);
    }
    const double n = std::min(double(lq->windows), kCountCap);
    const std::vector<const float*> rows = ringRows(*lq, width);
    std::vector<double> mean(width, 0.0), variance(width, 0.0);
    for (const float* x : rows)
      for (size_t j = 0; j < width; ++j) mean[j] += double(x[j]);
    for (size_t j = 0; j < width; ++j) mean[j] /= cd;
    for (const float* x : rows) {
      for (size_t j = 0; j < width; ++j) {
        const double d = double(x[j]) - mean[j];
        variance[j] += d * d;
      }
    }
    for (size_t j = 0; j < width; ++j) {
      const double v = variance[j] / cd;  // biased, as the code's var(unbiased=False)
      if (first) {
        lq->mu[j] = mean[j];
        lq->s2[j] = c > 1 ? v / (cd - 1) * cd : 0.0;
      } else {
        const double shift = mean[j] - lq->mu[j];
        lq->s2[j] = (lq->s2[j] * (n - 1 / cd) + v + shift * shift / (1 + 1 / n)) / (n + 1 - 1 / cd);
        lq->mu[j] = (lq->mu[j] * n + mean[j]) / (n + 1);
      }
    }
    double meanS2 = 0;
    for (size_t j = 0; j < width; ++j) meanS2 += lq->s2[j];
    lq->s2Floor = meanS2 / double(width) / 100;
    ++lq->windows;
  }

  // The spec's bias of one query row: mean_j (x_j - mu_j)^2 / (s2_j + mean(s2) / 100); 1 (uniform
  // weights) until kWarmupWindows windows have been seen.
  double biasOf(const LayerQueries& lq, const float* x, size_t width) const {
    if (lq.windows < kWarmupWindows) return 1.0;
    double b = 0;
    for (size_t j = 0; j < width; ++j) {
      const double denominator = lq.s2[j] + lq.s2Floor;
      const double d = double(x[j]) - lq.mu[j];
      if (denominator > 0) b += d * d / denominator;
    }
    return b / double(width);
  }

  static void addRow(LayerQueries* lq, const float* x, double weight, size_t width) {
    for (size_t j = 0; j < width; ++j) lq->weighted[j] += weight * double(x[j]);
    lq->biasTotal += weight;
  }

  // Recomputes the running sums from the ring under the current statistics.
  void rebuildSums(LayerQueries* lq, size_t width) const {
    lq->weighted.assign(width, 0.0);
    lq->biasTotal = 0;
    lq->bias.assign(size_t(queryWindow_), 0.0);
    const int64_t rows = std::min(lq->count, queryWindow_);
    for (int64_t k = 0; k < rows; ++k) {
      const float* x = lq->ring.data() + size_t(k) * width;
      lq->bias[size_t(k)] = biasOf(*lq, x, width);
      addRow(lq, x, lq->bias[size_t(k)], width);
    }
    lq->sumsWindows = lq->windows;
  }

  // p = sum_i w_i x_i over the ring with w_i = b_i / sum_i b_i, per q-head (the whole
  // [qHeads, headDim] row at once); uniform weights when the biases sum to 0 (or overflow).
  const std::vector<double>& probeOf(const SelectContext& context, int32_t layer) {
    LayerQueries& lq = queries_[size_t(layer)];
    if (lq.probeValid) return lq.probe;
    const size_t width = size_t(context.qHeads) * size_t(context.headDim);
    lq.probe.assign(width, 0.0);
    lq.probeValid = true;
    const int64_t rows = std::min(lq.count, queryWindow_);
    if (rows == 0) return lq.probe;  // no query yet: a zero probe (every key scores 0)
    if (lq.sumsWindows != lq.windows) rebuildSums(&lq, width);
    if (lq.biasTotal > 0 && std::isfinite(lq.biasTotal)) {
      for (size_t j = 0; j < width; ++j) lq.probe[j] = lq.weighted[j] / lq.biasTotal;
      return lq.probe;
    }
    for (int64_t k = 0; k < rows; ++k) {
      const float* x = lq.ring.data() + size_t(k) * width;
      for (size_t j = 0; j < width; ++j) lq.probe[j] += double(x[j]) / double(rows);
    }
    return lq.probe;
  }

  // Moves one layer's staged representatives into backend memory (one upload per kv head),
  // copying a buffer shared with a fork first (a buffer is only written by a policy that alone
  // holds it). Runs on the calling thread after the heads' parallel index() tasks (which make no
  // backend calls).
  Status store(SelectContext& context, int32_t layer) {
    for (int32_t h = 0; h < kvHeads_; ++h) {
      HeadBlocks* head = heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)].get();
      // index() gave a head with staged blocks a HeadBlocks of its own.
      if (head == nullptr || head->stagedNorms.empty()) continue;
      const bool bufferShared = head->buffer && head->buffer.use_count() > 1;
      const int64_t capacity = head->buffer ? head->buffer->capacity() : 0;
      const int64_t needed = head->stored + int64_t(head->stagedNorms.size());
      if (needed > capacity || bufferShared) {
        int64_t grown = needed > capacity ? std::max(needed, capacity + capacity / 2) : capacity;
        grown = (grown + kBlockGranule - 1) / kBlockGranule * kBlockGranule;
        std::shared_ptr<ReprBuffer> buffer;
        try {
          buffer = std::make_shared<ReprBuffer>(context.backend, context.headDim, reprType_);
        } catch (const std::bad_alloc&) {
          return Status(ErrorCode::OutOfMemory, "out of host memory for ActQKV block representatives");
        }
        KVSLIM_RETURN_IF_ERROR(buffer->allocate(grown));
        if (head->stored > 0) {
          KVSLIM_RETURN_IF_ERROR(context.backend.copy(buffer->repr(0), head->buffer->repr(0), size_t(head->stored) * buffer->rowBytes()));
          KVSLIM_RETURN_IF_ERROR(context.backend.copy(buffer->norms(), head->buffer->norms(), size_t(head->stored) * sizeof(double)));
        }
        head->buffer = std::move(buffer);
      }
      // The staged values are the dtype's already (represent() rounded them): the conversion is exact.
      std::vector<uint8_t> rows(head->staged.size() * dtypeBytes(reprType_));
      for (size_t i = 0; i < head->staged.size(); ++i) storeElement(rows.data(), reprType_, i, head->staged[i]);
      KVSLIM_RETURN_IF_ERROR(context.backend.upload(head->buffer->repr(head->stored), rows.data(), rows.size()));
      KVSLIM_RETURN_IF_ERROR(context.backend.upload(head->buffer->norms() + head->stored, head->stagedNorms.data(),
                                                    head->stagedNorms.size() * sizeof(double)));
      head->stored = needed;
      head->staged.clear();
      head->stagedNorms.clear();
    }
    return Status::ok();
  }

  // The representative of the newest block: the mean of its best keys (summed in position order,
  // rounded to f32, then to the store's dtype), and its norm.
  static void represent(HeadBlocks* head, size_t dim, DType type) {
    std::vector<size_t> byPosition(head->candScores.size());
    std::iota(byPosition.begin(), byPosition.end(), 0);
    std::sort(byPosition.begin(), byPosition.end(),
              [&](size_t a, size_t b) { return head->candPositions[a] < head->candPositions[b]; });
    float* repr = head->last.data();
    std::vector<double> wide(dim);
    for (size_t t = 0; t < dim; ++t) {
      double total = 0;
      for (const size_t c : byPosition) total += double(head->candKeys[c * dim + t]);
      uint8_t element[4];
      storeElement(element, type, 0, float(total / double(byPosition.size())));
      repr[t] = loadElement(element, type, 0);
      wide[t] = double(repr[t]);
    }
    double squared = 0;
    hostVectorOps().dotsF64(wide.data(), int32_t(dim), repr, 1, &squared);
    head->lastNorm = std::sqrt(squared);
  }

  // s_b = sum over the group's q-heads g of cos(r_b, p_g) + lambda cos(r_b, q_g)
  //     = (r_b . u) / |r_b| with u = sum_g p_g / |p_g| + lambda q_g / |q_g| (a zero vector adds 0):
  // this writes u ([headDim]) of kv head h; the backend scores the blocks with it.
  void scoreVector(const SelectContext& context, int32_t h, const std::vector<double>& probe, const float* lastQuery, double* u) const {
    const size_t dim = size_t(context.headDim);
    const int32_t group = context.qHeads / context.kvHeads;
    auto addUnit = [&](auto* v, double weight) {
      double norm = 0;
      for (size_t t = 0; t < dim; ++t) norm += double(v[t]) * double(v[t]);
      if (norm <= 0) return;
      const double factor = weight / std::sqrt(norm);
      for (size_t t = 0; t < dim; ++t) u[t] += double(v[t]) * factor;
    };
    for (int32_t g = 0; g < group; ++g) {
      const size_t qHead = size_t(h) * size_t(group) + size_t(g);
      addUnit(probe.data() + qHead * dim, 1.0);
      addUnit(lastQuery + qHead * dim, questionWeight_);
    }
  }

  // k_l from the step's remaining budget R_l: uniform R_l / (L - l) until every layer holds
  // kHistory entropy samples, then mean(h_l) / sum_{j >= l} mean(h_j) x R_l; rounded half away
  // from zero and clamped to [min(N_b, lower), min(N_b, 2 blocks)].
  int64_t allocate(int32_t layer, int64_t blocks) const {
    const int64_t lo = std::min(blocks, lower_), hi = std::min(blocks, 2 * blocks_);
    bool ready = true;
    for (const auto& samples : history_) ready = ready && samples.size() >= kHistory;
    double want = 0;
    if (!ready) {
      want = double(remaining_) / double(layers_ - layer);
    } else {
      auto mean = [](const std::vector<double>& v) {
        double total = 0;
        for (const double x : v) total += x;
        return total / double(v.size());
      };
      double rest = 0;
      for (int32_t j = layer; j < layers_; ++j) rest += mean(history_[size_t(j)]);
      want = mean(history_[size_t(layer)]) / rest * double(remaining_);
    }
    // A zero or undefined share (every entropy 0) falls back to the minimum, as the code does.
    const int64_t k = std::isfinite(want) ? int64_t(std::round(std::max(-1e15, std::min(1e15, want)))) : lo;
    return std::max(lo, std::min(hi, k));
  }

  int32_t layers_;
  int64_t blockSize_, blocks_;
  int32_t reprTopK_;
  int64_t queryWindow_;
  double questionWeight_, temperature_;
  int64_t lower_;
  std::vector<LayerQueries> queries_;
  std::vector<std::shared_ptr<HeadBlocks>> heads_;  // [layers * kvHeads]; null until indexed; shared by forks
  std::vector<std::vector<double>> history_;  // [layers]: the last kHistory layer entropies
  int32_t lastLayer_ = INT32_MAX;             // layer of the previous planLoad (a new step when not above it)
  int64_t remaining_ = 0;                     // R_l: blocks left in this step
  int32_t dim_;
  DType reprType_ = DType::F32;  // the store's, set by every call before the heads index
  ScoreScratch scores_;
};

}  // namespace

std::unique_ptr<SelectPolicy> makeActQKVPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads, int32_t headDim) {
  return std::make_unique<ActQKVPolicy>(config, layers, kvHeads, headDim);
}

}  // namespace kvslim
