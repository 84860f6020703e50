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
//   rounding would flip near ties. The block scores, O(N_b * headDim) per kv head and call, use
//   the host SIMD double dot (hostVectorOps().dotsF64); the rest are plain loops.
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

#include "../vector_ops.h"
#include "loading_policy.h"

namespace kvslim {

namespace {

constexpr int64_t kWarmupWindows = 4;  // deviation from the code's 1000 (see above)
constexpr double kCountCap = 1000;     // n, the windows the running statistics weigh, is capped
constexpr size_t kHistory = 100;       // entropy samples kept per layer

class ActQKVPolicy final : public LoadingPolicy {
 public:
  ActQKVPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads)
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
        history_(size_t(layers)) {}

  std::unique_ptr<SelectPolicy> clone() const override { return std::make_unique<ActQKVPolicy>(*this); }

  size_t indexBytes() const override {
    size_t bytes = 0;
    for (const std::shared_ptr<HeadBlocks>& shared : heads_) {
      if (!shared) continue;
      const HeadBlocks& head = *shared;
      bytes += (head.reprs.size() + head.candKeys.size()) * sizeof(float) + head.norms.size() * sizeof(double) +
               head.candScores.size() * (sizeof(double) + sizeof(int64_t));
    }
    for (const LayerQueries& layer : queries_) {
      bytes += layer.ring.size() * sizeof(float) +
               (layer.mu.size() + layer.s2.size() + layer.probe.size() + layer.bias.size() + layer.weighted.size()) * sizeof(double);
    }
    for (const auto& samples : history_) bytes += samples.size() * sizeof(double);
    return bytes;
  }

  Status afterAppend(SelectContext& context, int32_t layer, const float* q, int64_t n, bool prefill) override {
    if (prefill && q != nullptr) push(context, layer, q, n);
    probeOf(context, layer);  // index() reads it from the heads' parallel tasks
    return catchUp(context, layer, nullptr, 0);
  }

  Status planLoad(SelectContext& context, int32_t layer, const float* q, int64_t n, LoadPlan* plan) override {
    // A layer at or below the previous call's starts a new decode step with a fresh budget.
    if (layer <= lastLayer_) remaining_ = blocks_ * int64_t(layers_);
    lastLayer_ = layer;
    push(context, layer, q, n);
    const std::vector<double>& probe = probeOf(context, layer);
    KVSLIM_RETURN_IF_ERROR(catchUp(context, layer, nullptr, 0));
    plan->sink = sink_;
    plan->window = window_;
    plan->tokens.assign(size_t(kvHeads_), {});
    if (context.store.tokens(layer) <= sink_ + window_) return Status::ok();
    const int64_t end = dynamicEnd(context, layer);
    const int64_t blocks = (end - sink_ + blockSize_ - 1) / blockSize_;

    // Block scores per kv head (in parallel) and the layer's normalised entropy (mean over kv
    // heads, summed in head order).
    std::vector<std::vector<double>> scores(static_cast<size_t>(kvHeads_));
    std::vector<double> entropies(static_cast<size_t>(kvHeads_), 0.0);
    const float* lastQuery = q + size_t(n - 1) * size_t(context.qHeads) * size_t(context.headDim);
    KVSLIM_RETURN_IF_ERROR(forEachHead(context, [&](int32_t h) {
      scoreBlocks(context, layer, h, probe, lastQuery, blocks, &scores[size_t(h)]);
      entropies[size_t(h)] = normalisedEntropy(scores[size_t(h)]);
      return Status::ok();
    }));
    double entropy = 0;
    for (const double e : entropies) entropy += e;
    std::vector<double>& samples = history_[size_t(layer)];
    samples.push_back(entropy / kvHeads_);
    if (samples.size() > kHistory) samples.erase(samples.begin());

    const int64_t k = allocate(layer, blocks);
    remaining_ -= k;
    for (int32_t h = 0; h < kvHeads_; ++h) {
      const std::vector<double>& s = scores[size_t(h)];
      std::vector<int64_t> order(static_cast<size_t>(blocks));
      std::iota(order.begin(), order.end(), 0);
      // Best first, ties to the earlier block.
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [&](int64_t a, int64_t b) { return s[size_t(a)] > s[size_t(b)] || (s[size_t(a)] == s[size_t(b)] && a < b); });
      order.resize(size_t(k));
      std::sort(order.begin(), order.end());
      std::vector<int64_t>& tokens = plan->tokens[size_t(h)];
      for (const int64_t block : order) {
        const int64_t begin = sink_ + block * blockSize_;
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
      const size_t block = size_t((position - sink_) / blockSize_);
      if (block == head.norms.size()) {  // this key starts a block
        if (changed) represent(&head, dim);
        changed = false;
        head.reprs.resize(head.reprs.size() + dim, 0.0f);
        head.norms.push_back(0.0);
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
    if (changed) represent(&head, dim);
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
    std::vector<float> reprs;   // [blocks, headDim]; the last block may be partial
    std::vector<double> norms;  // [blocks]: |repr|
    // The last block's best keys so far: keys [<= reprTopK, headDim], their scores and positions.
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

  // The representative of the last block: the mean of its best keys (summed in position order,
  // stored as f32), and its norm.
  static void represent(HeadBlocks* head, size_t dim) {
    std::vector<size_t> byPosition(head->candScores.size());
    std::iota(byPosition.begin(), byPosition.end(), 0);
    std::sort(byPosition.begin(), byPosition.end(),
              [&](size_t a, size_t b) { return head->candPositions[a] < head->candPositions[b]; });
    float* repr = head->reprs.data() + (head->norms.size() - 1) * dim;
    std::vector<double> wide(dim);
    for (size_t t = 0; t < dim; ++t) {
      double total = 0;
      for (const size_t c : byPosition) total += double(head->candKeys[c * dim + t]);
      repr[t] = float(total / double(byPosition.size()));
      wide[t] = double(repr[t]);
    }
    double squared = 0;
    hostVectorOps().dotsF64(wide.data(), int32_t(dim), repr, 1, &squared);
    head->norms.back() = std::sqrt(squared);
  }

  // s_b = sum over the group's q-heads g of cos(r_b, p_g) + lambda cos(r_b, q_g)
  //     = (r_b . u) / |r_b| with u = sum_g p_g / |p_g| + lambda q_g / |q_g| (a zero vector adds 0).
  void scoreBlocks(const SelectContext& context, int32_t layer, int32_t h, const std::vector<double>& probe, const float* lastQuery,
                   int64_t blocks, std::vector<double>* scores) const {
    static const HeadBlocks kEmpty;
    const std::shared_ptr<HeadBlocks>& slot = heads_[size_t(layer) * size_t(kvHeads_) + size_t(h)];
    const HeadBlocks& head = slot ? *slot : kEmpty;
    const size_t dim = size_t(context.headDim);
    const int32_t group = context.qHeads / context.kvHeads;
    std::vector<double> u(dim, 0.0);
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
    scores->assign(size_t(blocks), 0.0);
    hostVectorOps().dotsF64(u.data(), int32_t(dim), head.reprs.data(), blocks, scores->data());
    for (int64_t b = 0; b < blocks; ++b) {
      const double norm = head.norms[size_t(b)];
      (*scores)[size_t(b)] = norm > 0 ? (*scores)[size_t(b)] / norm : 0.0;
    }
  }

  // Entropy of softmax(s / temperature) over ln(N_b); 1 for a single block.
  double normalisedEntropy(const std::vector<double>& s) const {
    if (s.size() <= 1) return 1.0;
    const double max = *std::max_element(s.begin(), s.end());
    std::vector<double> e(s.size(), 0.0);
    double z = 0;
    for (size_t b = 0; b < s.size(); ++b) {
      e[b] = std::exp((s[b] - max) / temperature_);
      z += e[b];
    }
    double entropy = 0;
    for (size_t b = 0; b < s.size(); ++b) {
      const double p = e[b] / z;
      if (p > 0) entropy -= p * std::log(p);
    }
    return entropy / std::log(double(s.size()));
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
};

}  // namespace

std::unique_ptr<SelectPolicy> makeActQKVPolicy(const SelectConfig& config, int32_t layers, int32_t kvHeads) {
  return std::make_unique<ActQKVPolicy>(config, layers, kvHeads);
}

}  // namespace kvslim
