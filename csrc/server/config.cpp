#include "server/config.h"

namespace membrain::server {

bool TokenGrant::all() const {
  for (const std::string& p : namespaces)
    if (p == "*") return true;
  return false;
}

bool TokenGrant::allows(std::string_view ns) const {
  for (const std::string& p : namespaces)
    if (glob_match(p, ns)) return true;
  return false;
}

bool glob_match(std::string_view p, std::string_view s) {
  // Iterative wildcard match with one backtrack point (the last '*'): linear in practice.
  std::size_t pi = 0, si = 0, star = std::string_view::npos, mark = 0;
  while (si < s.size()) {
    if (pi < p.size() && (p[pi] == '?' || p[pi] == s[si])) {
      ++pi;
      ++si;
    } else if (pi < p.size() && p[pi] == '*') {
      star = pi++;
      mark = si;
    } else if (star != std::string_view::npos) {
      pi = star + 1;
      si = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.size() && p[pi] == '*') ++pi;
  return pi == p.size();
}

}  // namespace membrain::server
