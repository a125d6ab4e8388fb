// asd_stream: generate a video from an AOTInductor engine and a prompt embedding, natively.
//
//   asd_stream --engine engines/tiny-s1-aoti-fp32 --prompt prompt.npy --chunks 4 --seed 0 \
//              [--out latents.npy] [--chunk-dir chunks/] [--frames frames.npy] [--video video.mp4]
//              [--ffmpeg PATH] [--fps 16] [--steps N] [--ffe 0|1] [--threads N] [--decoder vae|tiny]
//
// Outputs (at least one):
//   --out        the clean latents stacked as [1, C, 3 * chunks, h, w] float32 (.npy)
//   --chunk-dir  one latents file per chunk (chunk_0000.npy, ...), each as soon as it is done
//   --frames     the decoded frames, uint8 [T, H, W, 3] (.npy), written chunk by chunk as they
//                are decoded (constant memory; the file appears under its name when whole)
//   --video      an H.264 mp4 of the frames, piped chunk by chunk into ffmpeg (--ffmpeg PATH, or
//                `ffmpeg` on PATH; the imageio-ffmpeg wheel ships one), written to a temporary
//                name and renamed when ffmpeg finished cleanly
// Frames need the engine's decoder graphs (export.build exports them unless --decoder none);
// --decoder picks one of the engine's decoders (default: its primary, the first built).
// The prompt embedding comes from `python -m asd_deploy encode-prompt`. Uses only the C API.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

#include "asd_runtime.h"
#include "npy.h"

namespace {

int usage(const char* why) {
  std::fprintf(stderr,
               "asd_stream: %s\n"
               "usage: asd_stream --engine DIR --prompt EMBEDDING.npy [--out LATENTS.npy] [--frames FRAMES.npy]\n"
               "                  [--video VIDEO.mp4] [--chunks N] [--seed S] [--chunk-dir DIR] [--ffmpeg PATH]\n"
               "                  [--fps F] [--steps 1..4] [--ffe 0|1] [--threads N] [--decoder vae|tiny]\n"
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

bool ends_with(const std::string& s, const char* suffix) {
  size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

int fail(const char* what) {
  std::fprintf(stderr, "asd_stream: %s: %s\n", what, asd_last_error());
  return 1;
}

// `name` if it is a path to an executable, else its first match on PATH ("" if none).
std::string find_executable(const std::string& name) {
  if (name.find('/') != std::string::npos) return ::access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "";
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    std::string dir = dirs.substr(start, end == std::string::npos ? std::string::npos : end - start);
    std::string cand = (dir.empty() ? "." : dir) + "/" + name;
    if (::access(cand.c_str(), X_OK) == 0) return cand;
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return "";
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// rgb24 frames piped into ffmpeg, H.264 yuv420p, to `path.tmp.<pid>.mp4`, renamed on success.
class Mp4Pipe {
 public:
  Mp4Pipe(const std::string& ffmpeg, const std::string& path, int64_t h, int64_t w, long long fps)
      : path_(path), tmp_(path + ".tmp." + std::to_string(static_cast<long long>(::getpid())) + ".mp4") {
    std::string cmd = shell_quote(ffmpeg) + " -loglevel error -y -f rawvideo -pix_fmt rgb24 -s " + std::to_string(w) +
                      "x" + std::to_string(h) + " -r " + std::to_string(fps) +
                      " -i - -c:v libx264 -pix_fmt yuv420p -crf 18 " + shell_quote(tmp_);
    pipe_ = ::popen(cmd.c_str(), "w");
    if (pipe_ == nullptr) throw std::runtime_error("could not start " + ffmpeg);
  }
  ~Mp4Pipe() {
    if (pipe_ != nullptr) ::pclose(pipe_);
    if (!done_) std::remove(tmp_.c_str());
  }
  void write(const uint8_t* data, size_t bytes) {
    if (std::fwrite(data, 1, bytes, pipe_) != bytes) throw std::runtime_error("ffmpeg stopped reading frames");
  }
  void finish() {
    int status = ::pclose(pipe_);
    pipe_ = nullptr;
    if (status != 0) throw std::runtime_error("ffmpeg failed (exit status " + std::to_string(status) + ")");
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0)
      throw std::runtime_error("could not rename " + tmp_ + " to " + path_);
    done_ = true;
  }

 private:
  std::string path_, tmp_;
  FILE* pipe_ = nullptr;
  bool done_ = false;
};

}  // namespace

int main(int argc, char** argv) {
  std::string engine, prompt, out, chunk_dir, frames_out, video_out, ffmpeg = "ffmpeg", decoder;
  long long chunks = 4, seed = 0, steps = 0, ffe = -1, threads = 0, fps = 16;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") return usage("generate latents and frames natively"), 0;
    if (i + 1 >= argc) return usage(("missing value after " + a).c_str());
    const char* v = argv[++i];
    bool ok = true;
    if (a == "--engine") engine = v;
    else if (a == "--prompt") prompt = v;
    else if (a == "--out") out = v;
    else if (a == "--chunk-dir") chunk_dir = v;
    else if (a == "--frames") frames_out = v;
    else if (a == "--video") video_out = v;
    else if (a == "--ffmpeg") ffmpeg = v;
    else if (a == "--decoder") decoder = v;
    else if (a == "--fps") ok = parse_int(v, 1, 1000, &fps);
    else if (a == "--chunks") ok = parse_int(v, 1, 1000000, &chunks);
    else if (a == "--seed") ok = parse_int(v, 0, 0x7fffffffffffffffLL, &seed);
    else if (a == "--steps") ok = parse_int(v, 1, 4, &steps);
    else if (a == "--ffe") ok = parse_int(v, 0, 1, &ffe);
    else if (a == "--threads") ok = parse_int(v, 1, 4096, &threads);
    else return usage(("unknown option " + a).c_str());
    if (!ok) return usage(("bad value for " + a + ": " + v).c_str());
  }
  if (engine.empty() || prompt.empty()) return usage("--engine and --prompt are required");
  if (out.empty() && chunk_dir.empty() && frames_out.empty() && video_out.empty())
    return usage("give at least one output: --out, --chunk-dir, --frames or --video");
  if (!out.empty() && !ends_with(out, ".npy")) return usage("--out must end in .npy");
  if (!frames_out.empty() && !ends_with(frames_out, ".npy")) return usage("--frames must end in .npy");
  if (!video_out.empty() && !ends_with(video_out, ".mp4")) return usage("--video must end in .mp4");
  std::string ffmpeg_exe;
  if (!video_out.empty() && (ffmpeg_exe = find_executable(ffmpeg)).empty()) {
    std::fprintf(stderr,
                 "asd_stream: --video needs ffmpeg, and %s was not found; give --ffmpeg PATH (the imageio-ffmpeg "
                 "wheel ships one: python -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())') "
                 "or write --frames FRAMES.npy instead\n",
                 ffmpeg.c_str());
    return 2;
  }
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
  opts.decoder = decoder.empty() ? nullptr : decoder.c_str();
  auto t0 = std::chrono::steady_clock::now();
  asd_runtime* rt = nullptr;
  if (asd_create(engine.c_str(), &opts, &rt) != ASD_OK) return fail("cannot load the engine");
  int rc = 0;
  int64_t shape[5], numel = 0, height = 0, width = 0, max_frames = 0;
  const bool want_frames = !frames_out.empty() || !video_out.empty();
  if (asd_set_prompt_embedding_file(rt, prompt.c_str()) != ASD_OK || asd_chunk_shape(rt, shape) != ASD_OK ||
      asd_chunk_numel(rt, &numel) != ASD_OK) {
    rc = fail("cannot set the prompt");
  } else if (want_frames && asd_frame_shape(rt, &height, &width, &max_frames) != ASD_OK) {
    rc = fail("cannot write frames");
  } else {
    auto t1 = std::chrono::steady_clock::now();
    std::printf("engine %s loaded, prompt set in %.2f s\n", engine.c_str(),
                std::chrono::duration<double>(t1 - t0).count());
    // all [1, C, Fc, h, w] chunks, concatenated along frames: [1, C, Fc * chunks, h, w]
    const int64_t C = shape[1], F = shape[2], HW = shape[3] * shape[4];
    const int64_t total_frames = 1 + (max_frames / F) * (F * chunks - 1);  // 1 + 4(latent frames - 1)
    std::vector<float> chunk(static_cast<size_t>(numel));
    std::vector<float> all(out.empty() ? 0 : static_cast<size_t>(numel * chunks));
    std::vector<uint8_t> rgb(static_cast<size_t>(max_frames * height * width * 3));
    std::unique_ptr<asd::npy::StreamWriter> frames_file;
    std::unique_ptr<Mp4Pipe> video;
    try {
      if (!frames_out.empty())
        frames_file = std::make_unique<asd::npy::StreamWriter>(frames_out,
                                                               std::vector<int64_t>{total_frames, height, width, 3});
      if (!video_out.empty()) video = std::make_unique<Mp4Pipe>(ffmpeg_exe, video_out, height, width, fps);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "asd_stream: %s\n", e.what());
      rc = 1;
    }
    for (long long c = 0; c < chunks && rc == 0; ++c) {
      auto s = std::chrono::steady_clock::now();
      if (asd_next_chunk(rt, chunk.data(), numel) != ASD_OK) {
        rc = fail("generation failed");
        break;
      }
      double ms = 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
      if (!all.empty())
        for (int64_t ch = 0; ch < C; ++ch)
          std::memcpy(&all[static_cast<size_t>((ch * F * chunks + c * F) * HW)],
                      &chunk[static_cast<size_t>(ch * F * HW)], static_cast<size_t>(F * HW) * sizeof(float));
      try {
        if (!chunk_dir.empty()) {
          char name[32];
          std::snprintf(name, sizeof name, "/chunk_%04lld.npy", c);
          asd::npy::write_f32(chunk_dir + name, chunk.data(), {shape[0], C, F, shape[3], shape[4]});
        }
        double dec_ms = 0;
        if (want_frames) {
          auto d = std::chrono::steady_clock::now();
          int64_t n = 0;
          if (asd_decode_chunk(rt, chunk.data(), numel, rgb.data(), static_cast<int64_t>(rgb.size()), &n) != ASD_OK) {
            rc = fail("decoding failed");
            break;
          }
          dec_ms = 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - d).count();
          const size_t bytes = static_cast<size_t>(n * height * width * 3);
          if (frames_file) frames_file->append(rgb.data(), static_cast<int64_t>(bytes));
          if (video) video->write(rgb.data(), bytes);
        }
        if (want_frames) std::printf("chunk %lld: %.1f ms, decode %.1f ms\n", c, ms, dec_ms);
        else std::printf("chunk %lld: %.1f ms\n", c, ms);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "asd_stream: %s\n", e.what());
        rc = 1;
      }
    }
    if (rc == 0) {
      try {
        if (!out.empty()) {
          asd::npy::write_f32(out, all.data(), {shape[0], C, F * chunks, shape[3], shape[4]});
          std::printf("wrote %s [%lld, %lld, %lld, %lld, %lld]\n", out.c_str(), (long long)shape[0], (long long)C,
                      (long long)(F * chunks), (long long)shape[3], (long long)shape[4]);
        }
        if (frames_file) {
          frames_file->finish();
          std::printf("wrote %s uint8 [%lld, %lld, %lld, 3]\n", frames_out.c_str(), (long long)total_frames,
                      (long long)height, (long long)width);
        }
        if (video) {
          video->finish();
          std::printf("wrote %s (%lld frames %lldx%lld at %lld fps)\n", video_out.c_str(), (long long)total_frames,
                      (long long)width, (long long)height, fps);
        }
      } catch (const std::exception& e) {
        std::fprintf(stderr, "asd_stream: %s\n", e.what());
        rc = 1;
      }
    }
  }
  asd_destroy(rt);
  return rc;
}
