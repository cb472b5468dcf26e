#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "util/error.h"
#include "util/json.h"

namespace moescope {

MappedFile::MappedFile(const std::filesystem::path& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open: {}", path.string(), std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail("{}: cannot stat: {}", path.string(), std::strerror(err));
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      fail("{}: cannot map: {}", path.string(), std::strerror(err));
    }
    data_ = static_cast<const char*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<char*>(data_), size_);
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : file_(path) {
  const std::string where = path.string();
  const size_t size = file_.size();
  if (size < 8) fail("{}: truncated file ({} bytes; a safetensors file starts with an 8-byte header length)", where, size);
  uint64_t header_len = 0;
  std::memcpy(&header_len, file_.data(), 8);  // little-endian u64
  if (header_len > size - 8)
    fail("{}: header length {} runs past the end of the file ({} bytes)", where, header_len, size);
  Json header;
  try {
    header = Json::parse(file_.data() + 8, file_.data() + 8 + header_len);
  } catch (const Json::parse_error& e) {
    fail("{}: malformed header JSON: {}", where, e.what());
  }
  if (!header.is_object()) fail("{}: header is not a JSON object", where);

  const char* data_start = file_.data() + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  struct Span {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Span> spans;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
      fail("{}: tensor {}: header entry needs dtype, shape and data_offsets", where, name);
    TensorView t;
    t.name = name;
    const auto& dtype = entry["dtype"];
    if (!dtype.is_string() || !parse_dtype(dtype.get<std::string>(), &t.dtype))
      fail("{}: tensor {}: unsupported dtype {} (supported: BF16, F16, F32)", where, name, dtype.dump());
    const auto& shape = entry["shape"];
    if (!shape.is_array()) fail("{}: tensor {}: shape is not a list", where, name);
    uint64_t numel = 1;
    for (const auto& d : shape) {
      if (!d.is_number_unsigned()) fail("{}: tensor {}: shape {} has a non-integer or negative dimension", where, name, shape.dump());
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / 8 / dim)
        fail("{}: tensor {}: shape {} is too large", where, name, shape.dump());
      numel *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
      fail("{}: tensor {}: data_offsets must be two non-negative integers", where, name);
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    if (begin > end || end > data_size)
      fail("{}: tensor {}: data_offsets [{}, {}] out of range (data section is {} bytes{})", where, name, begin, end,
           data_size, end > data_size ? "; the file may be truncated" : "");
    if (end - begin != numel * dtype_size(t.dtype))
      fail("{}: tensor {}: data_offsets span {} bytes, but shape {} in {} needs {}", where, name, end - begin,
           shape.dump(), dtype_name(t.dtype), numel * dtype_size(t.dtype));
    t.data = data_start + begin;
    spans.push_back({begin, end, name});
    tensors_.emplace(name, std::move(t));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end)
      fail("{}: tensors {} and {} overlap (bytes [{}, {}) and [{}, {}))", where, spans[i - 1].name, spans[i].name,
           spans[i - 1].begin, spans[i - 1].end, spans[i].begin, spans[i].end);
}

WeightStore WeightStore::open(const std::filesystem::path& model_dir) {
  WeightStore store;
  store.dir_ = model_dir;
  const auto index_path = model_dir / "model.safetensors.index.json";
  const auto single_path = model_dir / "model.safetensors";
  auto add_file = [&](const std::filesystem::path& path) {
    auto file = std::make_shared<SafetensorsFile>(path);
    store.files_.push_back(file);
    return store.files_.size() - 1;
  };
  if (std::filesystem::exists(index_path)) {
    store.source_ = index_path;
    const Json index = read_json_file(index_path);
    if (!index.contains("weight_map") || !index["weight_map"].is_object())
      fail("{}: missing \"weight_map\" object", index_path.string());
    std::map<std::string, size_t> shard_of_file;
    for (const auto& [name, shard] : index["weight_map"].items()) {
      if (!shard.is_string()) fail("{}: weight_map entry {} is not a file name", index_path.string(), name);
      const std::string shard_name = shard.get<std::string>();
      if (shard_name.find('/') != std::string::npos || shard_name == "..")
        fail("{}: shard name \"{}\" must be a file in the model directory", index_path.string(), shard_name);
      auto it = shard_of_file.find(shard_name);
      if (it == shard_of_file.end()) {
        if (!std::filesystem::exists(model_dir / shard_name))
          fail("{}: shard {} (holding tensor {}) does not exist", index_path.string(), shard_name, name);
        it = shard_of_file.emplace(shard_name, add_file(model_dir / shard_name)).first;
      }
      const auto& shard_tensors = store.files_[it->second]->tensors();
      auto t = shard_tensors.find(name);
      if (t == shard_tensors.end())
        fail("{}: tensor {} is listed in {} but missing from the shard", (model_dir / shard_name).string(), name,
             index_path.filename().string());
      store.tensors_.emplace(name, t->second);
      store.file_index_.emplace(name, it->second);
    }
  } else if (std::filesystem::exists(single_path)) {
    store.source_ = single_path;
    const size_t i = add_file(single_path);
    for (const auto& [name, t] : store.files_[i]->tensors()) {
      store.tensors_.emplace(name, t);
      store.file_index_.emplace(name, i);
    }
  } else {
    fail("{}: no model.safetensors or model.safetensors.index.json", model_dir.string());
  }
  return store;
}

std::string WeightStore::file_of(const std::string& name) const {
  auto it = file_index_.find(name);
  return it == file_index_.end() ? dir_.string() : files_[it->second]->path().string();
}

const TensorView& WeightStore::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail("{}: missing tensor {}", source_.string(), name);
  return it->second;
}

const TensorView& WeightStore::get(const std::string& name, const std::vector<int64_t>& shape) const {
  const TensorView& t = get(name);
  if (t.shape != shape)
    fail("{}: tensor {} has shape {}, expected {}", file_of(name), name, shape_string(t.shape), shape_string(shape));
  return t;
}

}  // namespace moescope
