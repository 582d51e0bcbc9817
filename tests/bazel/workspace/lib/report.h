#pragma once

#include <string>

namespace report {

// A one-line summary: greeting, then the sum of squares of 0..n-1.
std::string summary(int n);

}  // namespace report
