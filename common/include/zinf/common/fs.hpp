#pragma once
// Files written so that a crash at any moment leaves either the old or the new content, never a
// torn mix: write to a temporary file in the same directory, fsync it, rename it over the target,
// fsync the directory.

#include <string>
#include <string_view>

namespace zinf {

// Throws zinf::Error naming the path and the OS reason (missing directory, disk full, ...).
void write_file_atomic(const std::string& path, std::string_view content);

}  // namespace zinf
