// Doc-stride windows and SQuAD 2.0 span decoding (engine/features.py, engine/decode.py), torch-free.
#pragma once

#include <cstdint>
#include <vector>

#include "qaengine/config.h"

namespace qaengine {

/// One model input. Tokens [context_start, context_start + context_count) are context tokens
/// [context_first, context_first + context_count) of the tokenized context.
struct Window {
  std::vector<int64_t> input_ids, token_type_ids;
  int64_t context_start = 0, context_first = 0, context_count = 0;
};

/// BERT: [CLS] q [SEP] chunk [SEP] (types 0.. 1..); RoBERTa: <s> q </s></s> chunk </s> (types 0). `question` is
/// already truncated to max_query_length. Consecutive chunks share doc_stride tokens.
std::vector<Window> make_windows(const std::vector<int64_t>& question, const std::vector<int64_t>& context,
                                 const WindowSettings& settings, Architecture arch, int64_t cls_id, int64_t sep_id);

/// Best span over all windows: context token indices [start_token, end_token] (inclusive), its score
/// start[i] + end[j] (float64), and the null score min over windows of start[0] + end[0].
struct SpanChoice {
  bool found = false;
  int64_t start_token = 0, end_token = 0;
  double score = 0.0, null_score = 0.0;
};

/// `start`/`end`: packed logits of the windows in order (window w's token t at cu[w] + t).
SpanChoice best_span(const std::vector<Window>& windows, const float* start, const float* end,
                     const std::vector<int32_t>& cu_seqlens, int64_t max_answer_length);

}  // namespace qaengine
