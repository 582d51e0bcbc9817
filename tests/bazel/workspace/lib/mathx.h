#pragma once

namespace mathx {

// Square of n, read from the generated table for 0..9, computed otherwise.
int square(int n);

// Sum of squares of 0..n-1.
long sum_of_squares(int n);

}  // namespace mathx
