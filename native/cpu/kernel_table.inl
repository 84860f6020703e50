// The dispatch table of one instruction set, from the kernels of attention_kernels.inl and
// kivi_kernels.inl (included before this file, inside the same anonymous namespace).
template <class V>
KernelTable makeTable() {
  KernelTable table;
  table.name = V::kName;
  table.vectorWidth = V::W;
  table.prefillRows = V::kPrefillRows;
  table.prefillBlockKeys = 2 * V::W;
  table.decodeRange = &decodeRange<V>;
  table.prefillTile = &prefillTile<V>;
  table.massTile = &massTile<V>;
  table.toFloat32 = &toFloat32<V>;
  table.transposeKeyBlock = &transposeKeyBlock<V>;
  table.streamSum = &streamSum<V>;
  table.fmaBurn = &fmaBurn<V>;
  table.kiviDecodeRange = &kiviDecodeRange<V>;
  table.scoreRange = &scoreRange<V>;
  table.scoreTile = &scoreTile<V>;
  table.maxDot = &maxDot<V, float>;
  table.dotMatrix = &dotMatrix<V, float>;
  table.maxDotGather = &maxDotGather<V, float>;
  table.maxDotHalf = &maxDot<V, uint16_t>;
  table.dotMatrixHalf = &dotMatrix<V, uint16_t>;
  table.maxDotGatherHalf = &maxDotGather<V, uint16_t>;
  table.dotsF64 = &dotsF64;
  table.boxBound = &boxBound<V>;
  table.softmaxRow = &softmaxRow<V>;
  table.softmaxInto = &softmaxInto<V>;
  return table;
}
