// asd_stream: generate latent chunks from an AOTInductor engine and a prompt embedding, natively.
//
//   asd_stream --engine engines/tiny-s1-aoti-fp32 --prompt prompt.npy --chunks 4 --seed 0 \
//              --out latents.npy [--chunk-dir chunks/] [--steps N] [--ffe 0|1] [--threads N]
//
// Writes the clean latents stacked as [1, C, 3 * chunks, h, w] float32 (.npy), and with
// --chunk-dir also one file per chunk (chunk_0000.npy, ...), each as soon as it is done. The
// prompt embedding comes from `python -m asd_deploy encode-prompt`. Uses only the C API.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <sys/stat.h>

#include "asd_runtime.h"
#include "npy.h"

namespace {

int usage(const char* why) {
  std::fprintf(stderr,
               "asd_stream: %s\n"
               "usage: asd_stream --engine DIR --prompt EMBEDDING.npy --out LATENTS.npy [--chunks N] [--seed S]\n"
               "                  [--chunk-dir DIR] [--steps 1..4] [--ffe 0|1] [--threads N]\n"
               "  DIR from: python -m export.build --backend aoti --steps 1\n"
               "  EMBEDDING.npy from: python -m asd_deploy encode-prompt --prompt \"...\" --out EMBEDDING.npy\n",
               why);
  return 2;
}

bool parse_int(const char* s, long long lo, long long hi, long long* out) {
  char* end = nullptr;
  long long v = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0' || v < lo || v > hi) return false;
  *out = v;
  return true;
}

int fail(const char* what) {
  std::fprintf(stderr, "asd_stream: %s: %s\n", what, asd_last_error());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string engine, prompt, out, chunk_dir;
  long long chunks = 4, seed = 0, steps = 0, ffe = -1, threads = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") return usage("generate latent chunks natively"), 0;
    if (i + 1 >= argc) return usage(("missing value after " + a).c_str());
    const char* v = argv[++i];
    bool ok = true;
    if (a == "--engine") engine = v;
    else if (a == "--prompt") prompt = v;
    else if (a == "--out") out = v;
    else if (a == "--chunk-dir") chunk_dir = v;
    else if (a == "--chunks") ok = parse_int(v, 1, 1000000, &chunks);
    else if (a == "--seed") ok = parse_int(v, 0, 0x7fffffffffffffffLL, &seed);
    else if (a == "--steps") ok = parse_int(v, 1, 4, &steps);
    else if (a == "--ffe") ok = parse_int(v, 0, 1, &ffe);
    else if (a == "--threads") ok = parse_int(v, 1, 4096, &threads);
    else return usage(("unknown option " + a).c_str());
    if (!ok) return usage(("bad value for " + a + ": " + v).c_str());
  }
  if (engine.empty() || prompt.empty() || out.empty()) return usage("--engine, --prompt and --out are required");
  if (out.size() < 4 || out.compare(out.size() - 4, 4, ".npy") != 0) return usage("--out must end in .npy");
  if (!chunk_dir.empty()) {
    struct stat st;
    if (::stat(chunk_dir.c_str(), &st) != 0 && ::mkdir(chunk_dir.c_str(), 0755) != 0) {
      std::fprintf(stderr, "asd_stream: cannot create --chunk-dir %s\n", chunk_dir.c_str());
      return 1;
    }
  }

  asd_options opts;
  asd_default_options(&opts);
  opts.seed = static_cast<uint64_t>(seed);
  opts.steps = static_cast<int32_t>(steps);
  opts.ffe = static_cast<int32_t>(ffe);
  opts.threads = static_cast<int32_t>(threads);
  auto t0 = std::chrono::steady_clock::now();
  asd_runtime* rt = nullptr;
  if (asd_create(engine.c_str(), &opts, &rt) != ASD_OK) return fail("cannot load the engine");
  int rc = 0;
  int64_t shape[5], numel = 0;
  if (asd_set_prompt_embedding_file(rt, prompt.c_str()) != ASD_OK || asd_chunk_shape(rt, shape) != ASD_OK ||
      asd_chunk_numel(rt, &numel) != ASD_OK) {
    rc = fail("cannot set the prompt");
  } else {
    auto t1 = std::chrono::steady_clock::now();
    std::printf("engine %s loaded, prompt set in %.2f s\n", engine.c_str(),
                std::chrono::duration<double>(t1 - t0).count());
    // all [1, C, Fc, h, w] chunks, concatenated along frames: [1, C, Fc * chunks, h, w]
    const int64_t C = shape[1], F = shape[2], HW = shape[3] * shape[4];
    std::vector<float> chunk(static_cast<size_t>(numel));
    std::vector<float> all(static_cast<size_t>(numel * chunks));
    for (long long c = 0; c < chunks && rc == 0; ++c) {
      auto s = std::chrono::steady_clock::now();
      if (asd_next_chunk(rt, chunk.data(), numel) != ASD_OK) {
        rc = fail("generation failed");
        break;
      }
      double ms = 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
      for (int64_t ch = 0; ch < C; ++ch)
        std::memcpy(&all[static_cast<size_t>((ch * F * chunks + c * F) * HW)], &chunk[static_cast<size_t>(ch * F * HW)],
                    static_cast<size_t>(F * HW) * sizeof(float));
      if (!chunk_dir.empty()) {
        char name[32];
        std::snprintf(name, sizeof name, "/chunk_%04lld.npy", c);
        try {
          asd::npy::write_f32(chunk_dir + name, chunk.data(), {shape[0], C, F, shape[3], shape[4]});
        } catch (const std::exception& e) {
          std::fprintf(stderr, "asd_stream: %s\n", e.what());
          rc = 1;
        }
      }
      std::printf("chunk %lld: %.1f ms\n", c, ms);
    }
    if (rc == 0) {
      try {
        asd::npy::write_f32(out, all.data(), {shape[0], C, F * chunks, shape[3], shape[4]});
        std::printf("wrote %s [%lld, %lld, %lld, %lld, %lld]\n", out.c_str(), (long long)shape[0], (long long)C,
                    (long long)(F * chunks), (long long)shape[3], (long long)shape[4]);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "asd_stream: %s\n", e.what());
        rc = 1;
      }
    }
  }
  asd_destroy(rt);
  return rc;
}
