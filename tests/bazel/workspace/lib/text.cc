#include "lib/text.h"

#include "lib/mathx.h"

namespace text {

std::string field(const std::string& name, long value) {
  return name + "=" + std::to_string(value);
}

std::string repeat(const std::string& s, int n, const std::string& sep) {
  std::string out;
  for (int i = 0; i < n; ++i) {
    if (i > 0) {
      out += sep;
    }
    out += s;
  }
  return out;
}

}  // namespace text
