#pragma once
// Host buffers for O_DIRECT I/O: 4 KiB-aligned start and a size rounded up to 4 KiB, so that any
// request that ends inside the buffer can round its tail up to a full block.

#include <cstddef>
#include <cstdint>
#include <span>

namespace zinf::io {

inline constexpr std::size_t kIoAlignment = 4096;  // bytes; O_DIRECT offset/length/address alignment

constexpr std::uint64_t round_up(std::uint64_t value, std::uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}
constexpr bool is_aligned(std::uint64_t value, std::uint64_t alignment = kIoAlignment) {
  return value % alignment == 0;
}
inline bool is_aligned(const void* p, std::uint64_t alignment = kIoAlignment) {
  return reinterpret_cast<std::uintptr_t>(p) % alignment == 0;
}

// Anonymous-mmap memory: page-aligned and zero-filled (lazily, by the kernel). Move-only.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // Throws zinf::Error when the memory cannot be mapped (names the size).
  explicit AlignedBuffer(std::size_t bytes);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  std::byte* data() noexcept { return data_; }
  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }  // a multiple of kIoAlignment
  std::span<std::byte> span() noexcept { return {data_, size_}; }
  std::span<const std::byte> span() const noexcept { return {data_, size_}; }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace zinf::io
