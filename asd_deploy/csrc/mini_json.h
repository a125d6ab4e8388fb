// A small JSON reader for engine manifests (objects, arrays, strings, numbers, true/false/null).
//
// Owns: parsing a whole document into `json::Value` and typed accessors that throw
// `std::runtime_error` naming the missing key or the wrong type. Does not own writing JSON or
// unicode escapes beyond \uXXXX in the Basic Multilingual Plane (manifests are ASCII).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace asd::json {

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  bool is_null() const { return kind == Kind::Null; }
  bool has(const std::string& key) const { return kind == Kind::Object && object.count(key) > 0; }

  const Value& at(const std::string& key) const {
    if (kind != Kind::Object) throw std::runtime_error("expected a JSON object holding \"" + key + "\"");
    auto it = object.find(key);
    if (it == object.end()) throw std::runtime_error("missing key \"" + key + "\"");
    return it->second;
  }
  const Value& at(size_t i) const {
    if (kind != Kind::Array || i >= array.size())
      throw std::runtime_error("expected a JSON array with an element " + std::to_string(i));
    return array[i];
  }
  const std::string& str() const {
    if (kind != Kind::String) throw std::runtime_error("expected a JSON string");
    return string;
  }
  double num() const {
    if (kind != Kind::Number) throw std::runtime_error("expected a JSON number");
    return number;
  }
  int64_t integer() const {
    double n = num();
    if (n != static_cast<double>(static_cast<int64_t>(n))) throw std::runtime_error("expected an integer");
    return static_cast<int64_t>(n);
  }
  bool flag() const {
    if (kind != Kind::Bool) throw std::runtime_error("expected true or false");
    return boolean;
  }
  std::vector<int64_t> ints() const {
    if (kind != Kind::Array) throw std::runtime_error("expected a JSON array of integers");
    std::vector<int64_t> out;
    for (const auto& v : array) out.push_back(v.integer());
    return out;
  }
};

namespace detail {

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value document() {
    Value v = value(0);
    skip_ws();
    if (i_ != s_.size()) fail("trailing characters after the document");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("invalid JSON at byte " + std::to_string(i_) + ": " + what);
  }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  char peek() {
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end of input");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }

  Value value(int depth) {
    if (depth > 64) fail("nesting deeper than 64");
    Value v;
    char c = peek();
    if (c == '{') {
      v.kind = Value::Kind::Object;
      ++i_;
      if (peek() == '}') { ++i_; return v; }
      while (true) {
        if (peek() != '"') fail("expected a string key");
        std::string key = string_body();
        expect(':');
        v.object[key] = value(depth + 1);
        if (peek() == ',') { ++i_; continue; }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind = Value::Kind::Array;
      ++i_;
      if (peek() == ']') { ++i_; return v; }
      while (true) {
        v.array.push_back(value(depth + 1));
        if (peek() == ',') { ++i_; continue; }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.kind = Value::Kind::String;
      v.string = string_body();
      return v;
    }
    if (literal("true")) { v.kind = Value::Kind::Bool; v.boolean = true; return v; }
    if (literal("false")) { v.kind = Value::Kind::Bool; return v; }
    if (literal("null")) return v;
    return number();
  }

  std::string string_body() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          if (i_ + 4 > s_.size()) fail("short \\u escape");
          unsigned cp = static_cast<unsigned>(std::stoul(s_.substr(i_, 4), nullptr, 16));
          i_ += 4;
          if (cp < 0x80) {
            out += static_cast<char>(cp);
          } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
          } else {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
          }
          break;
        }
        default: fail("unknown escape");
      }
    }
  }

  Value number() {
    size_t start = i_;
    if (i_ < s_.size() && (s_[i_] == '-' || s_[i_] == '+')) ++i_;
    while (i_ < s_.size() && (isdigit(static_cast<unsigned char>(s_[i_])) || s_[i_] == '.' || s_[i_] == 'e' ||
                              s_[i_] == 'E' || s_[i_] == '-' || s_[i_] == '+'))
      ++i_;
    if (start == i_) fail("unexpected character");
    Value v;
    v.kind = Value::Kind::Number;
    try {
      size_t used = 0;
      v.number = std::stod(s_.substr(start, i_ - start), &used);
      if (used != i_ - start) fail("malformed number");
    } catch (const std::logic_error&) {
      fail("malformed number");
    }
    return v;
  }
};

}  // namespace detail

inline Value parse(const std::string& text) { return detail::Parser(text).document(); }

}  // namespace asd::json
