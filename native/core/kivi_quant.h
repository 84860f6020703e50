// The KIVI group quantizer (methods/kivi.md): asymmetric min/scale per group, fp32 arithmetic,
// scale and min rounded to f16 *before* encoding so that encode and decode agree.
// Keys use channel groups (a group runs along tokens), values token groups (along channels).
#pragma once
#include <cstddef>
#include <cstdint>

namespace kvslim {

// Quantizes, for every channel c < channels, the `tokens` values x[t * rowStride + c] as one group
// (tokens * bits must be a multiple of 32). codes: [channels][tokens * bits / 32] words;
// scales, mins: [channels] f16. Returns false when a scale or min overflows f16.
bool quantizeChannelGroups(const float* x, size_t rowStride, int32_t tokens, int32_t channels, int32_t bits,
                           uint32_t* codes, uint16_t* scales, uint16_t* mins);

// Quantizes one token row of `channels` values in groups of `group` consecutive channels
// (channels % group == 0, group * bits % 32 == 0). codes: [channels * bits / 32] words;
// scales, mins: [channels / group] f16. Returns false when a scale or min overflows f16.
bool quantizeTokenGroups(const float* row, int32_t channels, int32_t group, int32_t bits, uint32_t* codes,
                         uint16_t* scales, uint16_t* mins);

// Inverses: x^ = code * scale + min in fp32.
void dequantizeChannelGroups(const uint32_t* codes, const uint16_t* scales, const uint16_t* mins, int32_t tokens,
                             int32_t channels, int32_t bits, float* x, size_t rowStride);
void dequantizeTokenGroups(const uint32_t* codes, const uint16_t* scales, const uint16_t* mins, int32_t channels,
                           int32_t group, int32_t bits, float* row);

}  // namespace kvslim
