#include "lib/report.h"

#include "gen/greeting.h"
#include "lib/mathx.h"
#include "lib/text.h"

namespace report {

std::string summary(int n) {
  return std::string(KILN_GREETING) + ": " +
         text::field("sum_of_squares", mathx::sum_of_squares(n));
}

}  // namespace report
