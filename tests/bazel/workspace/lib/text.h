#pragma once

#include <string>

namespace text {

// "name=value" with the value in decimal.
std::string field(const std::string& name, long value);

// Repeats s n times, separated by sep.
std::string repeat(const std::string& s, int n, const std::string& sep);

}  // namespace text
