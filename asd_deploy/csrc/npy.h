// NumPy `.npy` files of little-endian float32, C order: read and write (atomically).
//
// Owns: the format's header (versions 1.0-3.0 on read, 1.0 on write) and the temp-file-then-rename
// write. Does not own any other dtype: a prompt embedding or latents file with another dtype is an
// error that says which dtype was found and what to do.
#pragma once

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

namespace asd::npy {

struct Array {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace detail {
// The value of `'key': <value>` in the header dict, up to the next top-level comma or brace.
inline std::string header_field(const std::string& header, const std::string& key, const std::string& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) throw std::runtime_error(path + ": .npy header has no '" + key + "'");
  size_t colon = header.find(':', k);
  size_t start = header.find_first_not_of(' ', colon + 1);
  size_t end = header[start] == '(' ? header.find(')', start) + 1 : header.find_first_of(",}", start);
  return header.substr(start, end - start);
}
}  // namespace detail

inline Array read_f32(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path + " (expected a .npy file)");
  char magic[8];
  if (!f.read(magic, 8) || std::string(magic, 6) != "\x93NUMPY")
    throw std::runtime_error(path + " is not a .npy file (bad magic)");
  uint8_t major = static_cast<uint8_t>(magic[6]);
  uint32_t hlen = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!f.read(reinterpret_cast<char*>(b), 2)) throw std::runtime_error(path + ": truncated .npy header");
    hlen = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!f.read(reinterpret_cast<char*>(b), 4)) throw std::runtime_error(path + ": truncated .npy header");
    hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  } else {
    throw std::runtime_error(path + ": unsupported .npy version " + std::to_string(major));
  }
  std::string header(hlen, '\0');
  if (!f.read(&header[0], hlen)) throw std::runtime_error(path + ": truncated .npy header");
  std::string descr = detail::header_field(header, "descr", path);
  if (descr != "'<f4'")
    throw std::runtime_error(path + ": dtype " + descr + ", expected float32 ('<f4'); save it with "
                             "np.save(path, array.astype(np.float32))");
  if (detail::header_field(header, "fortran_order", path) != "False")
    throw std::runtime_error(path + ": Fortran-ordered array; save a C-contiguous array");
  std::string tuple = detail::header_field(header, "shape", path);
  Array a;
  int64_t numel = 1;
  std::string dims = tuple.substr(1, tuple.size() - 2);
  std::stringstream ss(dims);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    a.shape.push_back(std::stoll(item));
    numel *= a.shape.back();
  }
  a.data.resize(static_cast<size_t>(numel));
  if (!f.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(numel * sizeof(float))))
    throw std::runtime_error(path + ": truncated data (header says shape " + shape_str(a.shape) + ")");
  return a;
}

// Writes `path` through `path.tmp.<pid>` and a rename, so a reader never sees half a file.
inline void write_f32(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  std::string dims;
  int64_t numel = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    dims += (i ? ", " : "") + std::to_string(shape[i]);
    numel *= shape[i];
  }
  if (shape.size() == 1) dims += ",";  // a 1-tuple: "(n,)"
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string tmp = path + ".tmp." + std::to_string(static_cast<long long>(::getpid()));
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw std::runtime_error("cannot write " + tmp);
    f.write("\x93NUMPY\x01\x00", 8);
    uint16_t hlen = static_cast<uint16_t>(header.size());
    char b[2] = {static_cast<char>(hlen & 0xFF), static_cast<char>(hlen >> 8)};
    f.write(b, 2);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(numel * sizeof(float)));
    if (!f.flush()) {
      std::remove(tmp.c_str());
      throw std::runtime_error("could not write " + tmp + " (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error("could not rename " + tmp + " to " + path);
  }
}

}  // namespace asd::npy
