// The KIVI group quantizer (methods/kivi.md): asymmetric min/scale per group, fp32 arithmetic,
// scale and min rounded to f16 *before* encoding so that encode and decode agree.
// Keys use channel groups (a group runs along tokens), values token groups (along channels).
#pragma once
#include <cstddef>
#include <cstdint>

#include "kivi_format.h"

namespace kvslim {

// Quantizes, for every channel c < channels, the `tokens` values x[t * rowStride + c] as one group
// (tokens * bits must be a multiple of 32). codes: [channels][tokens * bits / 32] words;
// scales, mins: [channels] f16. Returns false when a scale or min overflows f16.
// skip (optional, [tokens * channels], index t * channels + c): entries left out of min/max (a
// channel whose entries are all skipped uses all of them); they are still encoded (clamped).
bool quantizeChannelGroups(const float* x, size_t rowStride, int32_t tokens, int32_t channels, int32_t bits,
                           uint32_t* codes, uint16_t* scales, uint16_t* mins, const uint8_t* skip = nullptr);

// Quantizes one token row of `channels` values in groups of `group` consecutive channels
// (channels % group == 0, group * bits % 32 == 0). codes: [channels * bits / 32] words;
// scales, mins: [channels / group] f16. Returns false when a scale or min overflows f16.
// skip (optional, [channels]) as for quantizeChannelGroups, per channel group.
bool quantizeTokenGroups(const float* row, int32_t channels, int32_t group, int32_t bits, uint32_t* codes,
                         uint16_t* scales, uint16_t* mins, const uint8_t* skip = nullptr);

// The `count` indices of x[0, n) with the largest |x| (ties: the lower index), increasing.
void selectOutliers(const float* x, int32_t n, int32_t count, uint16_t* indices);

// One whole record of kivi_format.h, outliers included (dense-and-sparse when the format has
// them). keys: [group, headDim] row-major; row: [headDim]. Returns false when a scale, min or
// outlier delta overflows f16.
bool quantizeKeyGroupRecord(const float* keys, const KiviFormat& format, uint8_t* record);
bool quantizeValueTokenRecord(const float* row, const KiviFormat& format, uint8_t* record);

// A record's values as attention reads them: x^, plus the delta at each outlier (fp32).
// keys: [group, headDim] row-major; row: [headDim].
void dequantizeKeyGroupRecord(const uint8_t* record, const KiviFormat& format, float* keys);
void dequantizeValueTokenRecord(const uint8_t* record, const KiviFormat& format, float* row);

// Inverses: x^ = code * scale + min in fp32.
void dequantizeChannelGroups(const uint32_t* codes, const uint16_t* scales, const uint16_t* mins, int32_t tokens,
                             int32_t channels, int32_t bits, float* x, size_t rowStride);
void dequantizeTokenGroups(const uint32_t* codes, const uint16_t* scales, const uint16_t* mins, int32_t channels,
                           int32_t group, int32_t bits, float* row);

}  // namespace kvslim
