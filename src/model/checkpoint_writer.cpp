#include "model/checkpoint_writer.h"

#include <algorithm>
#include <cstdio>
#include <memory>

#include "util/error.h"
#include "util/json.h"

namespace moescope {
namespace {

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

void write_safetensors(const std::filesystem::path& path, const std::vector<TensorSpec>& tensors) {
  Json header = Json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const TensorSpec& t : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(numel(t.shape)) * dtype_size(t.dtype);
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned

  std::unique_ptr<std::FILE, FileCloser> file(std::fopen(path.c_str(), "wb"));
  if (!file) fail("{}: cannot open for writing", path.string());
  const uint64_t header_len = header_text.size();
  bool ok = std::fwrite(&header_len, 8, 1, file.get()) == 1 &&
            std::fwrite(header_text.data(), 1, header_text.size(), file.get()) == header_text.size();

  constexpr int64_t k_chunk = 1 << 20;
  std::vector<float> values(k_chunk);
  std::vector<uint16_t> halves(k_chunk);
  for (const TensorSpec& t : tensors) {
    const int64_t n = numel(t.shape);
    for (int64_t first = 0; ok && first < n; first += k_chunk) {
      const int64_t count = std::min(k_chunk, n - first);
      t.fill(values.data(), first, count);
      if (t.dtype == DType::F32) {
        ok = std::fwrite(values.data(), 4, count, file.get()) == static_cast<size_t>(count);
        continue;
      }
      for (int64_t i = 0; i < count; ++i)
        halves[i] = t.dtype == DType::BF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
      ok = std::fwrite(halves.data(), 2, count, file.get()) == static_cast<size_t>(count);
    }
  }
  if (!ok || std::fflush(file.get()) != 0) fail("{}: write error (disk full?)", path.string());
}

}  // namespace moescope
