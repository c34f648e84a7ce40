// CTC prefix beam search, the compiled twin of dstrain/decoder/ctc.py (which is its specification and test
// oracle). Log probabilities are floats, as in DeepSpeech's native_client/ctcdecode. Language-model scores come
// from a Python callable (KenLM through the kenlm package), cached here per (bos, n-gram): they are needed only at
// word boundaries, and the same n-gram recurs at every frame its prefix survives.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr double kFltMin = std::numeric_limits<float>::min();

inline float log_sum_exp(float x, float y) {
  if (x == kNegInf) return y;
  if (y == kNegInf) return x;
  float m = std::max(x, y);
  return std::log(std::exp(x - m) + std::exp(y - m)) + m;
}

struct Node {
  int character = -1;
  int parent = -1;
  std::vector<std::pair<int, int>> children;  // (label, node), in insertion order
  bool exists = true;
  float b_prev = kNegInf, nb_prev = kNegInf, b_cur = kNegInf, nb_cur = kNegInf, score = kNegInf;
  int dict_state = 0;
};

struct Dictionary {
  int start = 0;
  std::vector<int64_t> pos, narcs;  // per state
  std::vector<int32_t> ilabel, next;  // per arc, sorted by ilabel within a state
  std::vector<uint8_t> final;
  bool present = false;

  int find(int state, int label) const {
    auto first = ilabel.begin() + pos[state], last = first + narcs[state];
    auto it = std::lower_bound(first, last, label);
    return (it != last && *it == label) ? next[it - ilabel.begin()] : -1;
  }
};

class Search {
 public:
  Search(int blank, int space, bool utf8, size_t beam, double cutoff_prob, size_t cutoff_top_n, const Dictionary* dict,
         py::object lm, float alpha, float beta, int max_order, const std::vector<std::string>* labels,
         const std::unordered_map<std::string, float>* hot_words, std::unordered_map<std::string, float>* cache)
      : blank_(blank), space_(space), utf8_(utf8), beam_(beam), cutoff_prob_(cutoff_prob), cutoff_top_n_(cutoff_top_n),
        dict_(dict), lm_(std::move(lm)), alpha_(alpha), beta_(beta), max_order_(max_order), labels_(labels),
        hot_words_(hot_words), cache_(cache) {
    nodes_.emplace_back();
    nodes_[0].score = nodes_[0].b_prev = 0.0f;
    nodes_[0].dict_state = dict_->present ? dict_->start : 0;
    prefixes_.push_back(0);
  }

  void step(const double* probs, int n_classes) {
    if (probs[blank_] < 0.999) started_ = true;
    if (!started_) return;  // DeepSpeech delays expansion through leading near-certain blanks
    float min_cutoff = kNegInf;
    bool full_beam = false;
    if (scoring()) {
      size_t n = std::min(prefixes_.size(), beam_);
      sort_prefixes();
      min_cutoff = nodes_[prefixes_[n - 1]].score + std::log(probs[blank_]) - std::max(0.0f, beta_);
      full_beam = n == beam_;
    }
    for (const auto& [c, log_prob_c] : pruned(probs, n_classes)) {
      size_t limit = std::min(prefixes_.size(), beam_);
      for (size_t i = 0; i < limit; ++i) {
        int p = prefixes_[i];
        if (full_beam && log_prob_c + nodes_[p].score < min_cutoff) break;
        if (nodes_[p].score == kNegInf) continue;
        if (c == blank_) {
          nodes_[p].b_cur = log_sum_exp(nodes_[p].b_cur, log_prob_c + nodes_[p].score);
          continue;
        }
        if (c == nodes_[p].character) nodes_[p].nb_cur = log_sum_exp(nodes_[p].nb_cur, log_prob_c + nodes_[p].nb_prev);
        int child = get_child(p, c);  // may reallocate nodes_: index again below
        if (child < 0) continue;
        const Node& pre = nodes_[p];
        float log_p;
        if (c == pre.character) {
          log_p = pre.b_prev > kNegInf ? log_prob_c + pre.b_prev : kNegInf;
        } else {
          log_p = log_prob_c + pre.score;
        }
        // Character mode scores the word a space completes; UTF-8 mode scores every completed codepoint.
        if (scoring()) {
          if (utf8_) {
            if (ends_codepoint(child)) log_p += word_score(child);
          } else if (c == space_) {
            log_p += word_score(p);
          }
        }
        nodes_[child].nb_cur = log_sum_exp(nodes_[child].nb_cur, log_p);
      }
    }
    prefixes_.clear();
    collect();
    if (prefixes_.size() > beam_) {
      sort_prefixes();
      for (size_t i = beam_; i < prefixes_.size(); ++i) remove(prefixes_[i]);
      prefixes_.resize(beam_);
    }
  }

  std::vector<std::pair<double, std::vector<int>>> results(size_t num_results) {
    std::vector<std::pair<float, int>> scored;
    for (size_t i = 0; i < prefixes_.size(); ++i) {
      int p = prefixes_[i];
      float s = nodes_[p].score;
      // The unfinished last word (or, in UTF-8 mode, an incomplete codepoint: out of vocabulary) is scored too.
      bool done = utf8_ ? ends_codepoint(p) : nodes_[p].character == space_;
      if (scoring() && i < beam_ && nodes_[p].parent >= 0 && !done) s += word_score(p);
      scored.emplace_back(s, p);
    }
    std::stable_sort(scored.begin(), scored.end(), [this](const auto& a, const auto& b) {
      if (a.first != b.first) return a.first > b.first;
      return nodes_[a.second].character < nodes_[b.second].character;
    });
    std::vector<std::pair<double, std::vector<int>>> out;
    for (size_t i = 0; i < scored.size() && i < num_results; ++i) out.emplace_back(scored[i].first, path(scored[i].second));
    return out;
  }

 private:
  bool scoring() const { return !lm_.is_none(); }

  void sort_prefixes() {
    std::stable_sort(prefixes_.begin(), prefixes_.end(), [this](int a, int b) {
      if (nodes_[a].score != nodes_[b].score) return nodes_[a].score > nodes_[b].score;
      return nodes_[a].character < nodes_[b].character;
    });
  }

  std::vector<std::pair<int, float>> pruned(const double* probs, int n) const {
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) order[i] = i;
    size_t cutoff_len = n;
    if (cutoff_prob_ < 1.0 || cutoff_top_n_ < static_cast<size_t>(n)) {
      std::stable_sort(order.begin(), order.end(), [probs](int a, int b) { return probs[a] > probs[b]; });
      if (cutoff_prob_ < 1.0) {
        double cumulative = 0.0;
        cutoff_len = 0;
        for (int i : order) {
          cumulative += probs[i];
          cutoff_len += 1;
          if (cumulative >= cutoff_prob_ || cutoff_len >= cutoff_top_n_) break;
        }
      }
    }
    std::vector<std::pair<int, float>> out;
    for (size_t i = 0; i < cutoff_len; ++i) out.emplace_back(order[i], static_cast<float>(std::log(probs[order[i]] + kFltMin)));
    return out;
  }

  int get_child(int p, int c) {
    for (const auto& [label, idx] : nodes_[p].children) {
      if (label != c) continue;
      Node& child = nodes_[idx];
      if (!child.exists) {
        child.exists = true;
        child.b_prev = child.nb_prev = child.b_cur = child.nb_cur = kNegInf;
      }
      return idx;
    }
    int dict_state = 0;
    if (dict_->present) {
      int next = dict_->find(nodes_[p].dict_state, c + 1);
      if (next < 0) return -1;  // outside the vocabulary
      dict_state = dict_->final[next] ? dict_->start : next;  // a complete word restarts the dictionary
    }
    int idx = static_cast<int>(nodes_.size());
    nodes_.emplace_back();
    nodes_[idx].character = c;
    nodes_[idx].parent = p;
    nodes_[idx].dict_state = dict_state;
    nodes_[p].children.emplace_back(c, idx);
    return idx;
  }

  void collect() {
    std::vector<int> stack{0};
    while (!stack.empty()) {
      int i = stack.back();
      stack.pop_back();
      Node& n = nodes_[i];
      if (n.exists) {
        n.b_prev = n.b_cur;
        n.nb_prev = n.nb_cur;
        n.b_cur = n.nb_cur = kNegInf;
        n.score = log_sum_exp(n.b_prev, n.nb_prev);
        prefixes_.push_back(i);
      }
      for (auto it = n.children.rbegin(); it != n.children.rend(); ++it) stack.push_back(it->second);
    }
  }

  void remove(int i) {
    nodes_[i].exists = false;
    while (nodes_[i].children.empty() && !nodes_[i].exists && nodes_[i].parent >= 0) {
      auto& siblings = nodes_[nodes_[i].parent].children;
      int c = nodes_[i].character;
      siblings.erase(std::find_if(siblings.begin(), siblings.end(), [c](const auto& e) { return e.first == c; }));
      i = nodes_[i].parent;
    }
  }

  std::vector<int> path(int i) const {
    std::vector<int> out;
    for (; nodes_[i].parent >= 0; i = nodes_[i].parent) out.push_back(nodes_[i].character);
    std::reverse(out.begin(), out.end());
    return out;
  }

  // UTF-8 mode: labels are bytes (label + 1). A byte starts a codepoint unless it is 10xxxxxx.
  unsigned char byte_of(int i) const { return static_cast<unsigned char>(nodes_[i].character + 1); }
  static bool starts_codepoint(unsigned char b) { return (b & 0xC0) != 0x80; }

  // Whether node i ends a complete codepoint (DeepSpeech's is_scoring_boundary in UTF-8 mode).
  bool ends_codepoint(int i) const {
    int distance = 1, j = i;
    while (!starts_codepoint(byte_of(j))) {
      j = nodes_[j].parent;
      if (j <= 0) return false;  // a continuation byte with no lead byte: not a boundary
      ++distance;
    }
    unsigned char first = byte_of(j);
    int needed = (first >> 3) == 0x1E ? 4 : (first >> 4) == 0x0E ? 3 : (first >> 5) == 0x06 ? 2 : (first >> 7) == 0 ? 1 : -1;
    return distance == needed;
  }

  // Up to max_order words ending at node i, oldest first (DeepSpeech's make_ngram); in UTF-8 mode a "word" is
  // one codepoint (get_prev_grapheme), the unit of a character-level language model.
  std::vector<std::string> ngram(int i) const {
    if (utf8_) return codepoint_ngram(i);
    std::vector<std::string> words;
    int current = i;
    for (int order = 0; order < max_order_; ++order) {
      if (current < 0 || nodes_[current].character == -1) break;
      std::vector<int> chars;
      while (nodes_[current].parent >= 0 && nodes_[current].character != space_) {
        chars.push_back(nodes_[current].character);
        current = nodes_[current].parent;
      }
      std::string word;
      for (auto it = chars.rbegin(); it != chars.rend(); ++it) word += (*labels_)[*it];
      words.push_back(word);
      current = nodes_[current].parent;
    }
    std::reverse(words.begin(), words.end());
    return words;
  }

  std::vector<std::string> codepoint_ngram(int i) const {
    std::vector<std::string> words;
    int current = i;
    for (int order = 0; order < max_order_ && current > 0; ++order) {
      std::string cp;
      while (current > 0) {
        cp.insert(cp.begin(), static_cast<char>(byte_of(current)));
        bool first = starts_codepoint(byte_of(current));
        current = nodes_[current].parent;
        if (first) break;
      }
      words.push_back(cp);
    }
    std::reverse(words.begin(), words.end());
    return words;
  }

  float word_score(int i) {
    std::vector<std::string> words = ngram(i);
    bool bos = static_cast<int>(words.size()) < max_order_;
    std::string key(1, bos ? '1' : '0');
    for (const auto& w : words) key += '\x01' + w;
    float lm;
    auto hit = cache_->find(key);
    if (hit != cache_->end()) {
      lm = hit->second;
    } else {
      py::tuple t(words.size());
      for (size_t k = 0; k < words.size(); ++k) t[k] = py::bytes(words[k]);  // may hold a partial codepoint
      lm = lm_(t, bos).cast<float>();
      cache_->emplace(std::move(key), lm);
    }
    float boost = 0.0f;
    if (!hot_words_->empty()) {
      for (const auto& w : words) {
        auto h = hot_words_->find(w);
        if (h != hot_words_->end()) boost += h->second;
      }
    }
    return (lm + boost) * alpha_ + beta_;
  }

  int blank_, space_;
  bool utf8_;
  size_t beam_;
  double cutoff_prob_;
  size_t cutoff_top_n_;
  const Dictionary* dict_;
  py::object lm_;
  float alpha_, beta_;
  int max_order_;
  const std::vector<std::string>* labels_;
  const std::unordered_map<std::string, float>* hot_words_;
  std::unordered_map<std::string, float>* cache_;
  std::vector<Node> nodes_;
  std::vector<int> prefixes_;
  bool started_ = false;
};

class Decoder {
 public:
  Decoder(std::vector<std::string> labels, int blank, int space, bool utf8)
      : labels_(std::move(labels)), blank_(blank), space_(space), utf8_(utf8) {}

  void set_dictionary(int start, py::array_t<int64_t> pos, py::array_t<int64_t> narcs, py::array_t<int32_t> ilabel,
                      py::array_t<int32_t> next, py::array_t<uint8_t> final) {
    dict_.start = start;
    dict_.pos.assign(pos.data(), pos.data() + pos.size());
    dict_.narcs.assign(narcs.data(), narcs.data() + narcs.size());
    dict_.ilabel.assign(ilabel.data(), ilabel.data() + ilabel.size());
    dict_.next.assign(next.data(), next.data() + next.size());
    dict_.final.assign(final.data(), final.data() + final.size());
    dict_.present = true;
  }

  void clear_cache() { cache_.clear(); }

  std::vector<std::pair<double, std::vector<int>>> decode(
      py::array_t<double, py::array::c_style | py::array::forcecast> probs, size_t beam, double cutoff_prob,
      size_t cutoff_top_n, py::object lm, float alpha, float beta, int max_order,
      const std::unordered_map<std::string, float>& hot_words, size_t num_results) {
    if (probs.ndim() != 2) throw std::invalid_argument("probs must be [time, classes]");
    if (beam < 1) throw std::invalid_argument("beam_size must be >= 1");
    const Dictionary none;
    Search search(blank_, space_, utf8_, beam, cutoff_prob, cutoff_top_n, lm.is_none() ? &none : &dict_, lm, alpha, beta,
                  max_order, &labels_, &hot_words, &cache_);
    const double* data = probs.data();
    int t_max = static_cast<int>(probs.shape(0)), n = static_cast<int>(probs.shape(1));
    for (int t = 0; t < t_max; ++t) search.step(data + static_cast<size_t>(t) * n, n);
    return search.results(num_results);
  }

 private:
  std::vector<std::string> labels_;
  int blank_, space_;
  bool utf8_;
  Dictionary dict_;
  std::unordered_map<std::string, float> cache_;
};

}  // namespace

PYBIND11_MODULE(_ctc_search, m) {
  m.doc() = "Compiled CTC prefix beam search (see dstrain.decoder.ctc)";
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<std::vector<std::string>, int, int, bool>(), py::arg("labels"), py::arg("blank"), py::arg("space"),
           py::arg("utf8"))
      .def("set_dictionary", &Decoder::set_dictionary)
      .def("clear_cache", &Decoder::clear_cache)
      .def("decode", &Decoder::decode, py::arg("probs"), py::arg("beam"), py::arg("cutoff_prob"), py::arg("cutoff_top_n"),
           py::arg("lm"), py::arg("alpha"), py::arg("beta"), py::arg("max_order"), py::arg("hot_words"),
           py::arg("num_results"));
}
