#include <cstdio>
#include <string>

#include "lib/report.h"
#include "lib/text.h"

int main() {
  int failures = 0;
  const std::string got = report::summary(10);
  const std::string want = "hello from kiln: sum_of_squares=285";
  if (got != want) {
    std::fprintf(stderr, "summary(10) = '%s', want '%s'\n", got.c_str(), want.c_str());
    ++failures;
  }
  if (text::repeat("ab", 3, "-") != "ab-ab-ab") {
    std::fprintf(stderr, "repeat failed\n");
    ++failures;
  }
  std::printf("report_test: %d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
