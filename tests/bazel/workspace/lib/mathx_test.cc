#include <cstdio>

#include "lib/mathx.h"

int main() {
  int failures = 0;
  if (mathx::square(7) != 49) {
    std::fprintf(stderr, "square(7) = %d\n", mathx::square(7));
    ++failures;
  }
  if (mathx::square(12) != 144) {
    std::fprintf(stderr, "square(12) = %d\n", mathx::square(12));
    ++failures;
  }
  if (mathx::sum_of_squares(10) != 285) {
    std::fprintf(stderr, "sum_of_squares(10) = %ld\n", mathx::sum_of_squares(10));
    ++failures;
  }
  std::printf("mathx_test: %d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
