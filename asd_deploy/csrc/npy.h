// NumPy `.npy` files of little-endian float32, C order: read and write (atomically); and uint8
// frames written as they come (`StreamWriter`: the shape is known up front, the data appended).
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

namespace detail {
// The 1.0 header for `descr` and `shape`, padded to a multiple of 64 bytes; numel through `numel`.
inline std::string header(const std::string& descr, const std::vector<int64_t>& shape, int64_t* numel) {
  std::string dims;
  *numel = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    dims += (i ? ", " : "") + std::to_string(shape[i]);
    *numel *= shape[i];
  }
  if (shape.size() == 1) dims += ",";  // a 1-tuple: "(n,)"
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  uint16_t hlen = static_cast<uint16_t>(header.size());
  return std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(hlen & 0xFF) + static_cast<char>(hlen >> 8) + header;
}
}  // namespace detail

// An .npy of uint8 with a shape known up front, written as its data comes (constant memory):
// to `path.tmp.<pid>`, renamed onto `path` by finish() once exactly shape's bytes were appended;
// destroyed unfinished, it removes the temporary file.
class StreamWriter {
 public:
  StreamWriter(const std::string& path, const std::vector<int64_t>& shape)
      : path_(path), tmp_(path + ".tmp." + std::to_string(static_cast<long long>(::getpid()))) {
    std::string head = detail::header("|u1", shape, &want_);
    f_.open(tmp_, std::ios::binary | std::ios::trunc);
    if (!f_ || !f_.write(head.data(), static_cast<std::streamsize>(head.size())))
      throw std::runtime_error("cannot write " + tmp_);
  }
  ~StreamWriter() {
    if (!done_) {
      f_.close();
      std::remove(tmp_.c_str());
    }
  }
  void append(const uint8_t* data, int64_t bytes) {
    if (written_ + bytes > want_) throw std::runtime_error(path_ + ": more data than its .npy shape holds");
    if (!f_.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(bytes)))
      throw std::runtime_error("could not write " + tmp_ + " (disk full?)");
    written_ += bytes;
  }
  void finish() {
    if (written_ != want_)
      throw std::runtime_error(path_ + ": " + std::to_string(written_) + " of " + std::to_string(want_) +
                               " bytes written; not renamed into place");
    f_.close();
    if (!f_ || std::rename(tmp_.c_str(), path_.c_str()) != 0)
      throw std::runtime_error("could not rename " + tmp_ + " to " + path_);
    done_ = true;
  }

 private:
  std::string path_, tmp_;
  std::ofstream f_;
  int64_t want_ = 0, written_ = 0;
  bool done_ = false;
};

// Writes `path` through `path.tmp.<pid>` and a rename, so a reader never sees half a file.
inline void write_f32(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  int64_t numel = 0;
  std::string head = detail::header("<f4", shape, &numel);
  std::string tmp = path + ".tmp." + std::to_string(static_cast<long long>(::getpid()));
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw std::runtime_error("cannot write " + tmp);
    f.write(head.data(), static_cast<std::streamsize>(head.size()));
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
