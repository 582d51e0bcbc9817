#include "lib/mathx.h"

#include "gen/squares.h"

namespace mathx {

int square(int n) {
  const int table_len = static_cast<int>(sizeof(kSquares) / sizeof(kSquares[0]));
  if (n >= 0 && n < table_len) {
    return kSquares[n];
  }
  return n * n;
}

long sum_of_squares(int n) {
  long total = 0;
  for (int i = 0; i < n; ++i) {
    total += square(i);
  }
  return total;
}

}  // namespace mathx
