// Template bodies of conv_common.h (included at its end).
#pragma once

namespace onnxsparse {

template <typename In, typename Out, typename Convert>
void prepare_input(const ConvAttrs& attrs, const Geometry& geo, const In* x, Out* prepared, Out pad_value,
                   Convert convert) {
    const int64_t planes = geo.batch * geo.channels, in_h = geo.in_h, in_w = geo.in_w;
    const int64_t plane_h = geo.plane_h, plane_w = geo.plane_w, phase_size = plane_h * plane_w;
    parallel_for(planes, num_threads(), [&](int64_t plane, int) {
        const In* src = x + plane * in_h * in_w;
        Out* dst = prepared + plane * geo.channel_stride;
        for (int64_t phase = 0; phase < geo.phases; ++phase) {
            const int64_t row_phase = geo.phase_row[phase], col_phase = geo.phase_col[phase];
            Out* dst_phase = dst + phase * phase_size;
            for (int64_t i = 0; i < plane_h; ++i) {
                Out* row = dst_phase + i * plane_w;
                const int64_t r = i * attrs.stride_h + row_phase - attrs.pad_top;
                if (r < 0 || r >= in_h) {
                    std::fill(row, row + plane_w, pad_value);
                    continue;
                }
                const In* src_row = src + r * in_w;
                if (attrs.stride_w == 1) {
                    // small planes (14x14, 7x7) spend more in per-row calls than in copying: the
                    // few pads by hand, the row in one memcpy
                    const int64_t begin = std::min(plane_w, attrs.pad_left);
                    const int64_t end = std::min(plane_w, attrs.pad_left + in_w);
                    for (int64_t j = 0; j < begin; ++j) row[j] = pad_value;
                    const In* from = src_row - attrs.pad_left;
                    if constexpr (std::is_same<Convert, Identity>::value && std::is_same<In, Out>::value) {
                        if (end > begin) std::memcpy(row + begin, from + begin, (end - begin) * sizeof(Out));
                    } else {
                        for (int64_t j = begin; j < end; ++j) row[j] = convert(from[j]);
                    }
                    for (int64_t j = end; j < plane_w; ++j) row[j] = pad_value;
                } else {
                    // columns j with 0 <= j * stride + col_phase - pad_left < in_w: [begin, end)
                    const int64_t stride = attrs.stride_w, first = col_phase - attrs.pad_left;
                    const int64_t begin = std::min(plane_w, first >= 0 ? 0 : (-first + stride - 1) / stride);
                    const int64_t end = std::max(begin, std::min(plane_w, (in_w - first + stride - 1) / stride));
                    std::fill(row, row + begin, pad_value);
                    const In* from = src_row + first;
                    if (stride == 2) {
                        for (int64_t j = begin; j < end; ++j) row[j] = convert(from[2 * j]);
                    } else {
                        for (int64_t j = begin; j < end; ++j) row[j] = convert(from[j * stride]);
                    }
                    std::fill(row + end, row + plane_w, pad_value);
                }
            }
        }
    });
    std::fill(prepared + planes * geo.channel_stride, prepared + geo.prepared_size, pad_value);
}

// Units of `block` rows x one input channel x the whole kernel that hold a nonzero.
template <typename W>
int64_t count_kept_units(const ConvAttrs& attrs, const W* weight, int64_t block) {
    const int64_t cg = attrs.channels_per_group, kk = attrs.kernel_positions(), og = attrs.out_per_group();
    int64_t kept = 0;
    for (int64_t g = 0; g < attrs.groups; ++g)
        for (int64_t b = 0; b < og; b += block)
            for (int64_t c = 0; c < cg; ++c) {
                bool any = false;
                for (int64_t r = b; r < std::min(og, b + block) && !any; ++r) {
                    const W* unit = weight + ((g * og + r) * cg + c) * kk;
                    for (int64_t k = 0; k < kk; ++k) any = any || unit[k] != 0;
                }
                kept += any;
            }
    return kept;
}

template <typename W, typename Packed>
void append_block(const ConvAttrs& attrs, const W* weight, int64_t group, int64_t first_row, int64_t rows,
                  int64_t stride, const std::vector<int64_t>& terms, bool paired, Encoding* encoding,
                  std::vector<Packed>* weights) {
    const int64_t cg = attrs.channels_per_group, kk = attrs.kernel_positions(), og = attrs.out_per_group();
    Block block;
    block.group = group;
    block.out0 = group * og + first_row;
    block.rows = rows;
    block.stride = stride;
    block.term_begin = static_cast<int64_t>(encoding->terms.size());
    block.weight_begin = static_cast<int64_t>(weights->size());
    auto value = [&](int64_t row, int64_t term) -> W {
        const int64_t c = term / kk, k = term % kk;
        return weight[((block.out0 + row) * cg + c) * kk + k];
    };
    const int64_t step = paired ? 2 : 1;
    for (size_t t = 0; t < terms.size(); t += step) {
        const bool alone = paired && t + 1 == terms.size();
        const int64_t first = terms[t], second = paired ? terms[alone ? t : t + 1] : first;
        encoding->terms.push_back(first);
        if (paired) encoding->terms.push_back(second);
        for (int64_t row = 0; row < stride; ++row) {
            if (row >= rows) {
                weights->push_back(Packed(0));
            } else if (paired) {
                const uint32_t low = static_cast<uint16_t>(static_cast<int16_t>(value(row, first)));
                const uint32_t high = alone ? 0u : static_cast<uint16_t>(static_cast<int16_t>(value(row, second)));
                weights->push_back(static_cast<Packed>(low | (high << 16)));
            } else {
                weights->push_back(static_cast<Packed>(value(row, first)));
            }
        }
    }
    block.term_end = static_cast<int64_t>(encoding->terms.size());
    encoding->blocks.push_back(block);
}

template <typename W, typename Packed>
Encoding encode_weight(const ConvAttrs& attrs, const W* weight, bool paired, std::vector<Packed>* weights) {
    const int64_t cg = attrs.channels_per_group, kk = attrs.kernel_positions(), og = attrs.out_per_group();
    const int64_t total = attrs.out_channels * cg * kk;
    Encoding encoding;
    for (int64_t i = 0; i < total; ++i) encoding.nonzeros += weight[i] != 0;

    // A block kernel pays for every weight of a kept unit; worth it when most of them are nonzero.
    constexpr double min_block_fill = 0.75;
    int64_t block = 0;
    if (encoding.nonzeros == total) {
        encoding.name = "dense";
        block = og >= 16 ? 16 : og >= 8 ? 8 : og >= 4 ? 4 : 0;
    } else {
        for (int64_t candidate : {16, 8, 4}) {
            if (og % candidate) continue;
            const int64_t stored = count_kept_units(attrs, weight, candidate) * candidate * kk;
            if (stored > 0 && encoding.nonzeros >= min_block_fill * static_cast<double>(stored)) {
                block = candidate;
                break;
            }
        }
        if (!block && encoding.nonzeros == 0) block = og % 16 == 0 ? 16 : og % 8 == 0 ? 8 : og % 4 == 0 ? 4 : 0;
        encoding.name = block ? "block" + std::to_string(block) : "csr";
    }

    std::vector<int64_t> terms;
    for (int64_t g = 0; g < attrs.groups; ++g) {
        if (block) {
            for (int64_t first = 0; first < og; first += block) {
                const int64_t rows = std::min(block, og - first);
                terms.clear();
                for (int64_t c = 0; c < cg; ++c) {
                    bool any = false;
                    for (int64_t r = first; r < first + rows && !any; ++r)
                        for (int64_t k = 0; k < kk; ++k) any = any || weight[((g * og + r) * cg + c) * kk + k] != 0;
                    if (any)
                        for (int64_t k = 0; k < kk; ++k) terms.push_back(c * kk + k);
                }
                append_block(attrs, weight, g, first, rows, block, terms, paired, &encoding, weights);
            }
        } else {
            for (int64_t r = 0; r < og; ++r) {
                terms.clear();
                for (int64_t term = 0; term < cg * kk; ++term)
                    if (weight[(g * og + r) * cg * kk + term] != 0) terms.push_back(term);
                append_block(attrs, weight, g, r, 1, 1, terms, paired, &encoding, weights);
            }
        }
    }
    return encoding;
}

}  // namespace onnxsparse
