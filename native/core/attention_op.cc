#include "attention_op.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <string>
#include <vector>

#include "shape_checks.h"

namespace kvslim {

namespace {
// Heads, and q [n, qHeads, headDim] / k [T, kvHeads, headDim] with n, T >= 1.
Status checkQK(const HostTensor& q, const HostTensor& k, int32_t qHeads, int32_t kvHeads, int32_t headDim) {
  KVSLIM_RETURN_IF_ERROR(checkHeads(qHeads, kvHeads, headDim));
  const size_t qRow = size_t(qHeads) * size_t(headDim);
  const size_t kvRow = size_t(kvHeads) * size_t(headDim);
  if (q.count == 0 || q.count % qRow != 0) {
    return Status(ErrorCode::Shape, "q must hold n x qHeads x headDim = n x " + std::to_string(qRow) +
                                        " elements with n >= 1, but holds " + std::to_string(q.count));
  }
  if (k.count == 0 || k.count % kvRow != 0) {
    return Status(ErrorCode::Shape, "k must hold T x kvHeads x headDim = T x " + std::to_string(kvRow) +
                                        " elements with T >= 1, but holds " + std::to_string(k.count));
  }
  return Status::ok();
}
}  // namespace

Status runAttention(Backend& backend, const AttentionOp& op, float* out, size_t outCount) {
  KVSLIM_RETURN_IF_ERROR(checkQK(op.q, op.k, op.qHeads, op.kvHeads, op.headDim));
  const size_t qRow = size_t(op.qHeads) * size_t(op.headDim);
  const size_t kvRow = size_t(op.kvHeads) * size_t(op.headDim);
  KVSLIM_RETURN_IF_ERROR(expectCount("v", op.v.count, op.k.count, "(the same as k)"));
  if (op.k.dtype != op.v.dtype) return Status(ErrorCode::Dtype, "k and v must have the same dtype");
  const int64_t n = int64_t(op.q.count / qRow);
  const int64_t tokens = int64_t(op.k.count / kvRow);
  KVSLIM_RETURN_IF_ERROR(expectCount("out", outCount, op.q.count, "(n x qHeads x headDim)"));
  if (op.causal && n > tokens) {
    return Status(ErrorCode::Shape, "causal attention needs at least as many keys as queries, but received n=" +
                                        std::to_string(n) + " queries and T=" + std::to_string(tokens) + " keys");
  }
  try {
    std::vector<float> q(op.q.count);
    KVSLIM_RETURN_IF_ERROR(toFloat32(op.q, q.data(), "q"));
    // Keys and values are checked too: one NaN key turns every output row into NaN.
    KVSLIM_RETURN_IF_ERROR(checkFinite(op.k, "k"));
    KVSLIM_RETURN_IF_ERROR(checkFinite(op.v, "v"));
    // Keys must sit in backend memory; on the CPU the user's arrays are used in place.
    const size_t kvBytes = op.k.count * dtypeBytes(op.k.dtype);
    BackendBuffer keyBuffer(backend), valueBuffer(backend);
    const void* keyBase = op.k.data;
    const void* valueBase = op.v.data;
    if (backend.kind() != DeviceKind::Cpu) {
      KVSLIM_RETURN_IF_ERROR(keyBuffer.upload(op.k.data, kvBytes));
      KVSLIM_RETURN_IF_ERROR(valueBuffer.upload(op.v.data, kvBytes));
      keyBase = keyBuffer.data();
      valueBase = valueBuffer.data();
    }
    // View the contiguous [T, kvHeads, headDim] tensors as one page per head (no copy).
    std::vector<const void*> keyPages(size_t(op.kvHeads)), valuePages(size_t(op.kvHeads));
    std::vector<KVHeadView> heads(size_t(op.kvHeads));
    const size_t elementBytes = dtypeBytes(op.k.dtype);
    for (int32_t h = 0; h < op.kvHeads; ++h) {
      keyPages[size_t(h)] = static_cast<const uint8_t*>(keyBase) + size_t(h) * size_t(op.headDim) * elementBytes;
      valuePages[size_t(h)] = static_cast<const uint8_t*>(valueBase) + size_t(h) * size_t(op.headDim) * elementBytes;
      heads[size_t(h)].keyPages = &keyPages[size_t(h)];
      heads[size_t(h)].valuePages = &valuePages[size_t(h)];
      heads[size_t(h)].tokens = tokens;
    }
    AttentionArgs args;
    args.q = q.data();
    args.out = out;
    args.n = int32_t(n);
    args.qHeads = op.qHeads;
    args.kvHeads = op.kvHeads;
    args.headDim = op.headDim;
    args.kvType = op.k.dtype;
    args.pageTokens = tokens;
    args.rowStride = int64_t(kvRow);
    args.heads = heads.data();
    args.causal = op.causal;
    args.scale = op.scale > 0.0f ? op.scale : 1.0f / std::sqrt(float(op.headDim));
    args.threads = op.threads;
    return backend.attention(args);
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory for attention over " + std::to_string(tokens) + " keys");
  }
}

Status runScores(Backend& backend, const ScoresOp& op, float* out, size_t outCount) {
  KVSLIM_RETURN_IF_ERROR(checkQK(op.q, op.k, op.qHeads, op.kvHeads, op.headDim));
  const size_t qRow = size_t(op.qHeads) * size_t(op.headDim);
  const size_t kvRow = size_t(op.kvHeads) * size_t(op.headDim);
  if (op.kvHead < -1 || op.kvHead >= op.kvHeads) {
    return Status(ErrorCode::Shape, "kvHead must be in [0, " + std::to_string(op.kvHeads - 1) + "], but received " +
                                        std::to_string(op.kvHead));
  }
  const int64_t n = int64_t(op.q.count / qRow), tokens = int64_t(op.k.count / kvRow);
  const int32_t group = op.qHeads / op.kvHeads;
  const int32_t firstHead = op.kvHead < 0 ? 0 : op.kvHead, lastHead = op.kvHead < 0 ? op.kvHeads : op.kvHead + 1;
  const int32_t heads = (lastHead - firstHead) * group;
  KVSLIM_RETURN_IF_ERROR(expectCount("out", outCount, size_t(n) * size_t(heads) * size_t(tokens), "(n x heads x T)"));
  try {
    std::vector<float> q(op.q.count);
    KVSLIM_RETURN_IF_ERROR(toFloat32(op.q, q.data(), "q"));
    KVSLIM_RETURN_IF_ERROR(checkFinite(op.k, "k"));
    const size_t kvBytes = op.k.count * dtypeBytes(op.k.dtype);
    BackendBuffer keyBuffer(backend);
    const void* keyBase = op.k.data;
    if (backend.kind() != DeviceKind::Cpu) {
      KVSLIM_RETURN_IF_ERROR(keyBuffer.upload(op.k.data, kvBytes));
      keyBase = keyBuffer.data();
    }
    std::vector<float> rows(size_t(n) * size_t(group) * size_t(op.headDim));
    // One kv head's scores are out's layout ([n, group, T]): written there directly. All heads go
    // through a head's buffer, copied to their place in [n, qHeads, T].
    const bool direct = lastHead - firstHead == 1;
    std::vector<float> scores(direct ? 0 : size_t(n) * size_t(group) * size_t(tokens));
    for (int32_t h = firstHead; h < lastHead; ++h) {
      // The group's query rows, (position, member) order.
      for (int64_t i = 0; i < n; ++i)
        for (int32_t g = 0; g < group; ++g)
          std::copy(q.begin() + (i * op.qHeads + h * group + g) * op.headDim, q.begin() + (i * op.qHeads + h * group + g + 1) * op.headDim,
                    rows.begin() + (i * group + g) * op.headDim);
      const void* page = static_cast<const uint8_t*>(keyBase) + size_t(h) * size_t(op.headDim) * dtypeBytes(op.k.dtype);
      ScoresArgs args;
      args.q = rows.data();
      args.rows = int32_t(n * group);
      args.headDim = op.headDim;
      args.kvType = op.k.dtype;
      args.pageTokens = tokens;
      args.rowStride = int64_t(kvRow);
      args.head.keyPages = &page;
      args.head.valuePages = &page;
      args.head.tokens = tokens;
      args.scale = op.scale > 0.0f ? op.scale : 1.0f / std::sqrt(float(op.headDim));
      args.out = direct ? out : scores.data();
      args.threads = op.threads;
      KVSLIM_RETURN_IF_ERROR(backend.attentionScores(args));
      if (direct) continue;
      for (int64_t i = 0; i < n; ++i)
        for (int32_t g = 0; g < group; ++g)
          std::copy(scores.begin() + (i * group + g) * tokens, scores.begin() + (i * group + g + 1) * tokens,
                    out + ((i * heads) + (h - firstHead) * group + g) * tokens);
    }
    return Status::ok();
  } catch (const std::bad_alloc&) {
    return Status(ErrorCode::OutOfMemory, "out of host memory for scores over " + std::to_string(tokens) + " keys");
  }
}

}  // namespace kvslim
