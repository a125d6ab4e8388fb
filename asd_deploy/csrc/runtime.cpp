// The native streaming runtime behind asd_runtime.h: engine validation, schedule, cache, loop.
//
// Owns: reading and checking an AOTInductor engine folder's manifest.json, the denoising schedule
// (the same closed form as asd_deploy/schedule.py, checked against the timesteps the manifest
// records), the static key/value cache with its ring over the non-sink slots (asd_deploy/cache.py),
// the noise order of asd_deploy/generator.py (one torch CPU generator: the chunk's noise, then
// one draw per re-noising), the decoder's causal cache between chunks (decode_first, then
// decode_next with the cache tensors it returned: asd_deploy/decoders/engine.py) and the frames'
// float -> uint8 conversion (asd_deploy.vae.to_uint8_frames), and the C ABI's error handling.
// Does not own the networks: the .pt2 packages hold them, run through libtorch's
// AOTIModelPackageLoader.
#include "asd_runtime.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "mini_json.h"
#include "npy.h"

namespace asd {

namespace {

struct Error : std::runtime_error {
  asd_status code;
  Error(asd_status c, const std::string& what) : std::runtime_error(what), code(c) {}
};

thread_local std::string last_error;

int64_t file_size(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return -1;
  return static_cast<int64_t>(st.st_size);
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

at::ScalarType scalar_type(const std::string& dtype) {
  if (dtype == "float32") return at::kFloat;
  if (dtype == "float16") return at::kHalf;
  if (dtype == "bfloat16") return at::kBFloat16;
  throw std::runtime_error("unsupported engine dtype \"" + dtype + "\"");
}

// Entries of the shifted sigma table (asd_deploy/schedule.py TABLE_SIZE): a constant of the schedule;
// sigma = table timestep / kTableSize. The network's timestep is num_train_timesteps * sigma.
constexpr double kTableSize = 1000.0;

// asd_deploy/schedule.py: 1000 * shift_sigma(1 - i / steps), i < steps, in the same double arithmetic.
std::vector<double> denoising_timesteps(int steps, double shift) {
  std::vector<double> out;
  const double n = kTableSize;
  for (int i = 0; i < steps; ++i) {
    double raw = n * (1 - static_cast<double>(i) / steps);
    double sigma = raw / n;
    out.push_back(n * (shift * sigma / (1 + (shift - 1) * sigma)));
  }
  return out;
}

bool cpu_supports(const std::string& isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#endif
  return true;  // an ISA this check does not know: the package loader reports what it can
}

}  // namespace

struct Runtime {
  // engine
  std::string dir, rebuild;
  at::ScalarType dtype = at::kFloat;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> step, cross;
  // decoder (absent from engines built with --decoder none)
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> dec_first, dec_next;
  std::vector<int64_t> dec_latents_shape;
  int64_t frame_h = 0, frame_w = 0, max_frames = 0;
  size_t dec_caches = 0;
  std::vector<int64_t> x_shape, t_shape, cache_shape, context_shape;
  int64_t fpc = 0, tokens_per_chunk = 0, cache_chunks = 0, sink_chunks = 0;
  // schedule
  double shift = 5.0;
  double num_train_timesteps = 1000.0;  // the model config's (manifest), scales sigma to the network's t
  int steps = 1, ffe_steps = 4;
  bool ffe = false;
  // stream state
  asd_options options{};
  at::Generator gen;
  at::Tensor cross_k, cross_v, cache_k, cache_v, pending;  // pending: last chunk, not yet cached
  std::vector<at::Tensor> dec_cache;                       // the decoder's causal cache
  bool dec_started = false;
  int64_t chunks_written = 0, chunks_done = 0;
  bool has_prompt = false;

  [[noreturn]] void engine_error(const std::string& what) const {
    std::string fix = rebuild.empty() ? "python -m export.build --backend aoti --steps 1" : rebuild;
    throw Error(ASD_ERR_ENGINE, "engine " + dir + ": " + what + "; rebuild it with: " + fix);
  }

  Runtime(const std::string& engine_dir, const asd_options& opts) : dir(engine_dir), options(opts) {
    std::string mpath = dir + "/manifest.json";
    if (file_size(mpath) < 0)
      throw Error(ASD_ERR_ENGINE, "no engine at " + dir + " (" + mpath + " not found); build one with: "
                  "python -m export.build --backend aoti --steps 1");
    json::Value m;
    try {
      m = json::parse(read_text(mpath));
    } catch (const std::exception& e) {
      engine_error(std::string("manifest.json is not valid JSON (") + e.what() + ")");
    }
    try {
      load(m);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      engine_error(std::string("manifest.json lacks what the runtime needs (") + e.what() + ")");
    }
    if (opts.threads < 0) throw Error(ASD_ERR_ARGUMENT, "options.threads must be >= 0");
    if (opts.threads > 0) at::set_num_threads(opts.threads);
    if (opts.steps != 0) {
      if (opts.steps < 1 || opts.steps > 4) throw Error(ASD_ERR_ARGUMENT, "options.steps must be 0 (manifest) or 1..4");
      steps = opts.steps;
    }
    if (opts.ffe < -1 || opts.ffe > 1) throw Error(ASD_ERR_ARGUMENT, "options.ffe must be -1 (manifest), 0 or 1");
    if (opts.ffe != -1) ffe = opts.ffe == 1;
    gen = at::make_generator<at::CPUGeneratorImpl>(opts.seed);
  }

  void load(const json::Value& m) {
    if (m.has("rebuild") && !m.at("rebuild").is_null()) rebuild = m.at("rebuild").str();
    if (!m.has("complete") || !m.at("complete").flag()) engine_error("the build did not finish (manifest not complete)");
    const std::string backend = m.at("backend").str();
    if (backend != "aoti")
      engine_error("it was built for backend \"" + backend + "\"; the C++ runtime runs AOTInductor engines "
                   "(python -m export.build --backend aoti ...)");
    const std::string device = m.has("device") ? m.at("device").str() : "cpu";
    if (device != "cpu") engine_error("it was compiled for " + device + "; this runtime runs CPU engines");
    const std::string built = m.at("torch_version").str();
    const std::string here = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                             std::to_string(TORCH_VERSION_PATCH);
    if (built.substr(0, built.find('+')) != here)
      engine_error("AOTInductor packages run only on the torch that built them: built with torch " + built +
                   ", this runtime links libtorch " + here);
    const std::string isa = m.at("host").has("cpu_isa") ? m.at("host").at("cpu_isa").str() : "unknown";
    if (!cpu_supports(isa)) engine_error("it was compiled for CPU ISA " + isa + ", which this CPU lacks");
    if (m.at("batch").integer() != 1) engine_error("it was built for batch " + std::to_string(m.at("batch").integer()) + "; the runtime streams batch 1");
    dtype = scalar_type(m.at("dtype").str());

    const auto& cfg = m.at("model").at("config");
    fpc = cfg.at("frames_per_chunk").integer();
    num_train_timesteps = static_cast<double>(cfg.at("num_train_timesteps").integer());
    if (num_train_timesteps <= 0) engine_error("its model config has num_train_timesteps <= 0");
    const auto& s_in = m.at("shapes").at("step").at("inputs");
    x_shape = s_in.at("x").at("shape").ints();
    t_shape = s_in.at("t").at("shape").ints();
    cache_shape = s_in.at("cache_k").at("shape").ints();
    context_shape = m.at("shapes").at("cross_kv").at("inputs").at("context").at("shape").ints();
    tokens_per_chunk = m.at("shapes").at("step").at("outputs").at("k_new").at("shape").ints().at(2);
    if (x_shape.size() != 5 || cache_shape.size() != 5 || context_shape.size() != 3 || tokens_per_chunk <= 0 ||
        cache_shape[2] % tokens_per_chunk != 0)
      engine_error("its recorded shapes are inconsistent");
    cache_chunks = cache_shape[2] / tokens_per_chunk;
    sink_chunks = cfg.at("sink_frames").integer() / fpc;
    if (cache_chunks != cfg.at("max_cache_frames").integer() / fpc || sink_chunks >= cache_chunks)
      engine_error("its cache shape disagrees with its model config");

    const auto& sched = m.at("schedule");
    shift = sched.at("shift").num();
    steps = static_cast<int>(sched.at("steps").integer());
    ffe = sched.at("ffe").flag();
    ffe_steps = static_cast<int>(sched.at("ffe_steps").integer());
    for (const auto& kv : sched.at("timesteps").object) {  // the manifest's numbers must be ours
      auto ours = denoising_timesteps(std::stoi(kv.first), shift);
      const auto& theirs = kv.second.array;
      bool same = ours.size() == theirs.size();
      for (size_t i = 0; same && i < ours.size(); ++i) same = std::fabs(ours[i] - theirs[i].num()) < 1e-6;
      if (!same) engine_error("its " + kv.first + "-step timesteps differ from this runtime's schedule");
    }

    const auto& rt = m.at("runtime");
    const auto& arts = m.at("artifacts");
    // which decoder: options.decoder names one of the engine's ("decoders" section, each with the
    // runtime entries of its graphs); none named: the primary ("decoder", graphs decode_first/next)
    const std::string want = options.decoder ? options.decoder : "";
    const json::Value* dec = nullptr;
    std::string first_role = "decode_first", next_role = "decode_next";
    if (!want.empty()) {
      if (m.has("decoders") && m.at("decoders").has(want)) {
        dec = &m.at("decoders").at(want);
        if (dec->has("graphs")) {
          first_role = dec->at("graphs").at("decode_first").str();
          next_role = dec->at("graphs").at("decode_next").str();
        }
      } else if (m.has("decoder") && !m.at("decoder").is_null() && m.at("decoder").at("kind").str() == want) {
        dec = &m.at("decoder");  // built before engines carried several decoders
      } else {
        std::string have;
        if (m.has("decoders"))
          for (const auto& kv : m.at("decoders").object) have += (have.empty() ? "" : ",") + kv.first;
        else if (m.has("decoder") && !m.at("decoder").is_null())
          have = m.at("decoder").at("kind").str();
        throw Error(ASD_ERR_ENGINE, "engine " + dir + " has no \"" + want + "\" decoder (it has: " +
                    (have.empty() ? std::string("none") : have) + "); rebuild it with --decoder " +
                    (have.empty() ? want : have + "," + want) + " (its build command: " +
                    (rebuild.empty() ? std::string("python -m export.build --backend aoti") : rebuild) + ")");
      }
    } else if (m.has("decoder") && !m.at("decoder").is_null()) {
      dec = &m.at("decoder");
    }
    const bool has_decoder = dec != nullptr && rt.has(first_role) && rt.has(next_role);  // else latents only
    std::vector<std::string> roles{"step", "cross_kv"};
    if (has_decoder) roles.insert(roles.end(), {first_role, next_role});
    for (const auto& role : roles) {
      const std::string name = rt.at(role).str();
      const std::string path = dir + "/" + name;
      int64_t size = file_size(path);
      if (size < 0) engine_error(name + " is missing");
      if (!arts.has(name)) engine_error("the manifest has no record of " + name);
      if (size != arts.at(name).at("bytes").integer())
        engine_error(name + " is " + std::to_string(size) + " bytes, the manifest recorded " +
                     std::to_string(arts.at(name).at("bytes").integer()) + " (truncated or replaced)");
    }
    try {
      step = std::make_unique<torch::inductor::AOTIModelPackageLoader>(dir + "/" + rt.at("step").str(), "model");
      cross = std::make_unique<torch::inductor::AOTIModelPackageLoader>(dir + "/" + rt.at("cross_kv").str(), "model");
    } catch (const std::exception& e) {
      std::string first = e.what();
      engine_error("its AOTInductor packages could not be loaded (" + first.substr(0, first.find('\n')) + ")");
    }
    if (has_decoder) load_decoder(*dec, rt.at(first_role).str(), rt.at(next_role).str());
  }

  // The decoder's static shapes (its manifest section: ordered I/O lists by graph role) and its packages.
  void load_decoder(const json::Value& d, const std::string& first_file, const std::string& next_file) {
    const auto& first_out = d.at("shapes").at("decode_first").at("outputs");
    const auto& next_in = d.at("shapes").at("decode_next").at("inputs");
    const auto& next_out = d.at("shapes").at("decode_next").at("outputs");
    dec_latents_shape = next_in.at(0).at("shape").ints();
    auto video = next_out.at(0).at("shape").ints();  // [1, 3, 4 Fc, H, W]
    if (dec_latents_shape != x_shape || video.size() != 5 || video[1] != 3 ||
        first_out.array.size() != next_out.array.size() || next_in.array.size() != next_out.array.size())
      engine_error("its decoder shapes disagree with its step's chunk shape");
    dec_caches = next_in.array.size() - 1;
    max_frames = video[2];
    frame_h = video[3];
    frame_w = video[4];
    try {
      using Loader = torch::inductor::AOTIModelPackageLoader;
      dec_first = std::make_unique<Loader>(dir + "/" + first_file, "model");
      dec_next = std::make_unique<Loader>(dir + "/" + next_file, "model");
    } catch (const std::exception& e) {
      std::string first = e.what();
      engine_error("its decoder packages could not be loaded (" + first.substr(0, first.find('\n')) + ")");
    }
  }

  // One chunk's latents [1, C, Fc, h, w] -> uint8 frames [T, H, W, 3] (T = 1 + 4(Fc-1) for the
  // stream's first chunk, 4 Fc after), carrying the decoder's cache to the next call.
  void require_decoder() const {
    if (!dec_first)
      throw Error(ASD_ERR_STATE, "engine " + dir + " has no decoder graphs (built with --decoder none?); rebuild it "
                  "with them: " + (rebuild.empty() ? std::string("python -m export.build --backend aoti") : rebuild));
  }

  at::Tensor decode(const at::Tensor& latents) {
    require_decoder();
    c10::InferenceMode guard;
    std::vector<at::Tensor> in{latents.to(at::kFloat).contiguous()};
    // a package's inputs must be contiguous (its kernels assume the traced strides); the caches
    // it returned are often views into a larger buffer (the last 2 frames of an activation)
    if (dec_started)
      for (const auto& c : dec_cache) in.push_back(c.contiguous());
    auto out = (dec_started ? dec_next : dec_first)->run(in);
    if (out.size() != 1 + dec_caches || out[0].dim() != 5 || out[0].size(1) != 3)
      throw Error(ASD_ERR_RUNTIME, "the decoder returned outputs of unexpected count or shape");
    dec_cache.assign(out.begin() + 1, out.end());
    dec_started = true;
    // as asd_deploy.vae.to_uint8_frames: [1, 3, T, H, W] in [-1, 1] -> [T, H, W, 3]
    return ((out[0].to(at::kFloat).clamp(-1, 1) + 1) * 127.5).round().to(at::kByte).permute({0, 2, 3, 4, 1})[0]
        .contiguous();
  }

  void set_prompt(const float* data, int64_t numel) {
    const int64_t want = context_shape[1] * context_shape[2];
    if (numel != want)
      throw Error(ASD_ERR_ARGUMENT, "prompt embedding has " + std::to_string(numel) + " values; this engine wants [" +
                  std::to_string(context_shape[1]) + ", " + std::to_string(context_shape[2]) +
                  "] = " + std::to_string(want) + " (text_len, text_dim of its model config)");
    c10::InferenceMode guard;
    at::Tensor ctx = at::from_blob(const_cast<float*>(data), context_shape, at::kFloat).to(dtype).clone();
    auto out = cross->run({ctx});
    if (out.size() != 2) throw Error(ASD_ERR_RUNTIME, "cross_kv.pt2 returned " + std::to_string(out.size()) + " outputs, expected 2");
    cross_k = out[0];
    cross_v = out[1];
    has_prompt = true;
    restart(options.seed);
  }

  void restart(uint64_t seed) {
    options.seed = seed;
    gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    cache_k = at::zeros(cache_shape, at::TensorOptions().dtype(dtype));
    cache_v = at::zeros(cache_shape, at::TensorOptions().dtype(dtype));
    pending = at::Tensor();
    chunks_written = chunks_done = 0;
    dec_cache.clear();
    dec_started = false;
  }

  int steps_for_chunk(int64_t chunk) const { return (ffe && chunk == 0) ? ffe_steps : steps; }

  std::vector<at::Tensor> run_step(const at::Tensor& x, double timestep) {
    at::Tensor t = at::full(t_shape, timestep, at::TensorOptions().dtype(dtype));
    at::Tensor frame_index = at::full({1}, chunks_written * fpc, at::kLong);
    at::Tensor cache_len = at::full({1}, std::min(chunks_written, cache_chunks) * tokens_per_chunk, at::kLong);
    auto out = step->run({x.to(dtype).contiguous(), t, cross_k, cross_v, cache_k, cache_v, frame_index, cache_len});
    if (out.size() != 3 || out[0].sizes() != x.sizes())
      throw Error(ASD_ERR_RUNTIME, "step.pt2 returned outputs of unexpected count or shape");
    return out;
  }

  // The clean pass: the finished chunk at timestep 0 writes its keys/values into the cache.
  void cache_pending() {
    auto out = run_step(pending, 0.0);
    int64_t slot = chunks_written < cache_chunks
                       ? chunks_written
                       : sink_chunks + (chunks_written - sink_chunks) % (cache_chunks - sink_chunks);
    at::Tensor idx = at::arange(slot * tokens_per_chunk, (slot + 1) * tokens_per_chunk, at::kLong);
    cache_k.index_copy_(2, idx, out[1].to(dtype));
    cache_v.index_copy_(2, idx, out[2].to(dtype));
    ++chunks_written;
    pending = at::Tensor();
  }

  at::Tensor next_chunk() {
    if (!has_prompt) throw Error(ASD_ERR_STATE, "no prompt embedding set (call asd_set_prompt_embedding first)");
    c10::InferenceMode guard;
    if (pending.defined()) cache_pending();
    at::Tensor x = at::randn(x_shape, gen, at::TensorOptions().dtype(at::kFloat));
    std::vector<double> ts = denoising_timesteps(steps_for_chunk(chunks_done), shift);
    at::Tensor x0;
    for (size_t i = 0; i < ts.size(); ++i) {
      double sigma = ts[i] / kTableSize;
      at::Tensor flow = run_step(x, num_train_timesteps * sigma)[0].to(at::kFloat);
      x0 = x - sigma * flow;
      if (i + 1 < ts.size()) {
        double next = ts[i + 1] / kTableSize;
        at::Tensor eps = at::randn(x_shape, gen, at::TensorOptions().dtype(at::kFloat));
        x = (1 - next) * x0 + next * eps;
      }
    }
    pending = x0;
    ++chunks_done;
    return x0;
  }
};

}  // namespace asd

// ---------------------------------------------------------------------------------------------
// C ABI: every entry point converts exceptions into a status and asd_last_error().
// ---------------------------------------------------------------------------------------------

struct asd_runtime {
  std::unique_ptr<asd::Runtime> impl;
};

namespace {

template <typename F>
asd_status guarded(F&& f) {
  asd::last_error.clear();
  try {
    f();
    return ASD_OK;
  } catch (const asd::Error& e) {
    asd::last_error = e.what();
    return e.code;
  } catch (const std::exception& e) {
    asd::last_error = std::string("runtime failure: ") + e.what();
    return ASD_ERR_RUNTIME;
  } catch (...) {
    asd::last_error = "runtime failure: unknown exception";
    return ASD_ERR_RUNTIME;
  }
}

asd::Runtime& get(const asd_runtime* rt) {
  if (rt == nullptr || !rt->impl) throw asd::Error(ASD_ERR_ARGUMENT, "null runtime handle");
  return *rt->impl;
}

}  // namespace

extern "C" {

void asd_default_options(asd_options* o) {
  if (o == nullptr) return;
  o->seed = 0;
  o->steps = 0;
  o->ffe = -1;
  o->threads = 0;
  o->decoder = nullptr;
}

asd_status asd_create(const char* engine_dir, const asd_options* options, asd_runtime** out) {
  if (out != nullptr) *out = nullptr;
  return guarded([&] {
    if (engine_dir == nullptr || out == nullptr) throw asd::Error(ASD_ERR_ARGUMENT, "engine_dir and out must not be null");
    asd_options o;
    asd_default_options(&o);
    if (options != nullptr) o = *options;
    auto rt = std::make_unique<asd_runtime>();
    rt->impl = std::make_unique<asd::Runtime>(engine_dir, o);
    *out = rt.release();
  });
}

void asd_destroy(asd_runtime* rt) { delete rt; }

asd_status asd_set_prompt_embedding(asd_runtime* rt, const float* data, int64_t numel) {
  return guarded([&] {
    auto& r = get(rt);
    if (data == nullptr) throw asd::Error(ASD_ERR_ARGUMENT, "prompt embedding pointer is null");
    r.set_prompt(data, numel);
  });
}

asd_status asd_set_prompt_embedding_file(asd_runtime* rt, const char* npy_path) {
  return guarded([&] {
    auto& r = get(rt);
    if (npy_path == nullptr) throw asd::Error(ASD_ERR_ARGUMENT, "prompt embedding path is null");
    asd::npy::Array a;
    try {
      a = asd::npy::read_f32(npy_path);
    } catch (const std::exception& e) {
      throw asd::Error(ASD_ERR_IO, e.what());
    }
    const auto& want = r.context_shape;
    bool ok = (a.shape.size() == 3 && a.shape[0] == 1 && a.shape[1] == want[1] && a.shape[2] == want[2]) ||
              (a.shape.size() == 2 && a.shape[0] == want[1] && a.shape[1] == want[2]);
    if (!ok)
      throw asd::Error(ASD_ERR_ARGUMENT, std::string(npy_path) + " holds an embedding of shape " +
                       asd::npy::shape_str(a.shape) + "; this engine wants [1, " + std::to_string(want[1]) + ", " +
                       std::to_string(want[2]) + "] (python -m asd_deploy encode-prompt writes it)");
    r.set_prompt(a.data.data(), static_cast<int64_t>(a.data.size()));
  });
}

asd_status asd_prompt_shape(const asd_runtime* rt, int64_t* text_len, int64_t* text_dim) {
  return guarded([&] {
    auto& r = get(rt);
    if (text_len == nullptr || text_dim == nullptr) throw asd::Error(ASD_ERR_ARGUMENT, "null output pointer");
    *text_len = r.context_shape[1];
    *text_dim = r.context_shape[2];
  });
}

asd_status asd_reset(asd_runtime* rt, uint64_t seed) {
  return guarded([&] { get(rt).restart(seed); });
}

asd_status asd_chunk_shape(const asd_runtime* rt, int64_t shape[5]) {
  return guarded([&] {
    auto& r = get(rt);
    if (shape == nullptr) throw asd::Error(ASD_ERR_ARGUMENT, "null shape pointer");
    for (int i = 0; i < 5; ++i) shape[i] = r.x_shape[i];
  });
}

asd_status asd_chunk_numel(const asd_runtime* rt, int64_t* numel) {
  return guarded([&] {
    auto& r = get(rt);
    if (numel == nullptr) throw asd::Error(ASD_ERR_ARGUMENT, "null numel pointer");
    int64_t n = 1;
    for (int64_t d : r.x_shape) n *= d;
    *numel = n;
  });
}

asd_status asd_next_chunk(asd_runtime* rt, float* out, int64_t capacity) {
  return guarded([&] {
    auto& r = get(rt);
    int64_t n = 1;
    for (int64_t d : r.x_shape) n *= d;
    if (out == nullptr || capacity < n)
      throw asd::Error(ASD_ERR_ARGUMENT, "output buffer must hold " + std::to_string(n) + " floats; got " +
                       (out == nullptr ? std::string("a null pointer") : std::to_string(capacity)));
    at::Tensor x0 = r.next_chunk().contiguous();
    std::memcpy(out, x0.data_ptr<float>(), static_cast<size_t>(n) * sizeof(float));
  });
}

int64_t asd_chunks_done(const asd_runtime* rt) { return (rt && rt->impl) ? rt->impl->chunks_done : 0; }

int32_t asd_has_decoder(const asd_runtime* rt) { return (rt && rt->impl && rt->impl->dec_first) ? 1 : 0; }

asd_status asd_frame_shape(const asd_runtime* rt, int64_t* height, int64_t* width, int64_t* max_frames) {
  return guarded([&] {
    auto& r = get(rt);
    if (height == nullptr || width == nullptr || max_frames == nullptr)
      throw asd::Error(ASD_ERR_ARGUMENT, "null output pointer");
    r.require_decoder();
    *height = r.frame_h;
    *width = r.frame_w;
    *max_frames = r.max_frames;
  });
}

asd_status asd_decode_chunk(asd_runtime* rt, const float* latents, int64_t numel, uint8_t* frames, int64_t capacity,
                            int64_t* num_frames) {
  return guarded([&] {
    auto& r = get(rt);
    r.require_decoder();
    int64_t n = 1;
    for (int64_t d : r.x_shape) n *= d;
    if (latents == nullptr || numel != n)
      throw asd::Error(ASD_ERR_ARGUMENT, "latents must be one chunk of " + std::to_string(n) +
                       " floats (asd_chunk_shape); got " +
                       (latents == nullptr ? std::string("a null pointer") : std::to_string(numel)));
    const int64_t need = r.max_frames * r.frame_h * r.frame_w * 3;
    if (frames == nullptr || num_frames == nullptr || capacity < need)
      throw asd::Error(ASD_ERR_ARGUMENT, "frames must hold " + std::to_string(need) + " bytes (max_frames * height * "
                       "width * 3 from asd_frame_shape) and num_frames must not be null");
    at::Tensor lat = at::from_blob(const_cast<float*>(latents), r.x_shape, at::kFloat);
    at::Tensor out = r.decode(lat);
    std::memcpy(frames, out.data_ptr<uint8_t>(), static_cast<size_t>(out.numel()));
    *num_frames = out.size(0);
  });
}

const char* asd_last_error(void) { return asd::last_error.c_str(); }

}  // extern "C"
