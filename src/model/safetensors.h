#pragma once
// safetensors over mmap: tensors stay in their file dtype and are read in place, never copied.
// Every header field is validated against the file before a tensor is handed out.
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace moescope {

// A read-only memory mapping of a whole file (RAII).
class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const char* data() const { return data_; }
  size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  const char* data_ = nullptr;
  size_t size_ = 0;
};

// One .safetensors file: header parsed and checked (dtype, shape × dtype = byte length, offsets inside
// the data section, no two tensors overlapping).
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::filesystem::path& path() const { return file_.path(); }

 private:
  MappedFile file_;
  std::map<std::string, TensorView> tensors_;
};

// All tensors of a model directory: model.safetensors, or the shards named by
// model.safetensors.index.json.
class WeightStore {
 public:
  static WeightStore open(const std::filesystem::path& model_dir);

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // Throws Error naming the tensor and the file that should hold it (model.safetensors or the index)
  // when it is missing.
  const TensorView& get(const std::string& name) const;
  // Like get(), and checks the shape: "model.layers.0.mlp.gate.weight: shape [8, 63], expected [8, 64]".
  const TensorView& get(const std::string& name, const std::vector<int64_t>& shape) const;
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  // The file a tensor lives in, for messages.
  std::string file_of(const std::string& name) const;

 private:
  std::filesystem::path dir_;
  std::filesystem::path source_;  // model.safetensors or model.safetensors.index.json, for messages
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, size_t> file_index_;  // tensor -> files_ index
};

}  // namespace moescope
