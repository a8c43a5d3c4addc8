#include "windows.h"

#include <algorithm>
#include <limits>

namespace qaengine {

std::vector<Window> make_windows(const std::vector<int64_t>& q, const std::vector<int64_t>& c,
                                 const WindowSettings& settings, Architecture arch, int64_t cls_id, int64_t sep_id) {
  const bool bert = arch == Architecture::Bert;
  const int64_t specials = bert ? 3 : 4;
  const int64_t n = static_cast<int64_t>(c.size());
  const int64_t room = settings.max_seq_length - static_cast<int64_t>(q.size()) - specials;
  const int64_t step = std::max<int64_t>(1, room - settings.doc_stride);
  std::vector<int64_t> head{cls_id};
  head.insert(head.end(), q.begin(), q.end());
  head.push_back(sep_id);
  if (!bert) head.push_back(sep_id);
  const int64_t context_type = bert ? 1 : 0;
  std::vector<Window> out;
  for (int64_t start = 0;; start += step) {
    const int64_t stop = std::min(start + room, n);
    Window w;
    w.input_ids = head;
    w.input_ids.insert(w.input_ids.end(), c.begin() + start, c.begin() + stop);
    w.input_ids.push_back(sep_id);
    w.token_type_ids.assign(head.size(), 0);
    w.token_type_ids.resize(w.input_ids.size(), context_type);
    w.context_start = static_cast<int64_t>(head.size());
    w.context_first = start;
    w.context_count = stop - start;
    out.push_back(std::move(w));
    if (stop >= n) return out;
  }
}

SpanChoice best_span(const std::vector<Window>& windows, const float* start, const float* end,
                     const std::vector<int32_t>& cu, int64_t max_answer_length) {
  SpanChoice best;
  best.score = -std::numeric_limits<double>::infinity();
  best.null_score = std::numeric_limits<double>::infinity();
  for (size_t w = 0; w < windows.size(); ++w) {
    const float* s = start + cu[w];
    const float* e = end + cu[w];
    best.null_score = std::min(best.null_score, static_cast<double>(s[0]) + static_cast<double>(e[0]));
    const int64_t lo = windows[w].context_start, n = windows[w].context_count;
    for (int64_t i = 0; i < n; ++i) {
      const double si = s[lo + i];
      const int64_t jmax = std::min(n, i + max_answer_length);
      for (int64_t j = i; j < jmax; ++j) {
        const double score = si + static_cast<double>(e[lo + j]);
        if (score > best.score) {
          best.found = true;
          best.score = score;
          best.start_token = windows[w].context_first + i;
          best.end_token = windows[w].context_first + j;
        }
      }
    }
  }
  return best;
}

}  // namespace qaengine
