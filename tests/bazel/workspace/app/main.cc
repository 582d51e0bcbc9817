#include <cstdio>
#include <cstdlib>

#include "lib/report.h"

int main(int argc, char** argv) {
  const int n = argc > 1 ? std::atoi(argv[1]) : 10;
  std::printf("%s\n", report::summary(n).c_str());
  return 0;
}
