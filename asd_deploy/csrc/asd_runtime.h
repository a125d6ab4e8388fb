/* asd_runtime: the streaming chunk generator of asd-deploy, embeddable from C and C++.
 *
 * It loads an AOTInductor engine folder written by
 *     python -m export.build --backend aoti [--steps N] [--ffe]
 * (manifest.json + step.pt2 + cross_kv.pt2 [+ decode_first.pt2, decode_next.pt2]) and runs the
 * autoregressive loop natively, and the decoder to frames when the engine has it: the
 * manifest's denoising schedule (steps, First-Frame Enhancement), the static key/value cache with
 * its rolling window, seeded noise (the same numbers as the Python runtime's
 * torch.Generator(seed)), and the clean-cache pass after every chunk.
 *
 * Every call returns ASD_OK or an error code; no call throws or aborts on bad input. The message
 * of the last failure on the calling thread is asd_last_error(). A handle is not thread-safe:
 * use one handle per thread (handles share nothing).
 *
 * Typical use:
 *     asd_runtime* rt;  asd_options o;  asd_default_options(&o);  o.seed = 7;
 *     if (asd_create("engines/tiny-s1-aoti-fp32", &o, &rt) != ASD_OK) puts(asd_last_error());
 *     asd_set_prompt_embedding_file(rt, "prompt.npy");      // from `python -m asd_deploy encode-prompt`
 *     int64_t n;  asd_chunk_numel(rt, &n);   float* buf = malloc(n * sizeof(float));
 *     for (int c = 0; c < 10; ++c) asd_next_chunk(rt, buf, n);   // clean latents [1, C, 3, h, w]
 *     // frames: asd_frame_shape(rt, &H, &W, &T); asd_decode_chunk(rt, buf, n, rgb, T * H * W * 3, &t);
 *     asd_destroy(rt);
 */
#ifndef ASD_RUNTIME_H
#define ASD_RUNTIME_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define ASD_API __attribute__((visibility("default")))
#else
#define ASD_API
#endif

typedef enum asd_status {
  ASD_OK = 0,
  ASD_ERR_ARGUMENT = 1,   /* a null pointer, a wrong size or shape, a bad option value */
  ASD_ERR_ENGINE = 2,     /* engine folder or manifest missing, mismatched, truncated or unloadable */
  ASD_ERR_STATE = 3,      /* e.g. asd_next_chunk before a prompt was set */
  ASD_ERR_RUNTIME = 4,    /* the engine failed while running */
  ASD_ERR_IO = 5          /* a file could not be read or written */
} asd_status;

typedef struct asd_options {
  uint64_t seed;      /* noise seed; the same seed gives the same video as the Python runtime */
  int32_t steps;      /* denoising steps per chunk, 1..4; 0 = the manifest's */
  int32_t ffe;        /* First-Frame Enhancement: 1 on, 0 off, -1 = the manifest's */
  int32_t threads;    /* intra-op CPU threads; 0 = leave libtorch's default */
  const char* decoder; /* which of the engine's decoders decodes frames: "vae", "tiny" (export.build
                          --decoder vae,tiny); NULL or "" = its primary one (the first built).
                          Read only while asd_create runs. */
} asd_options;

typedef struct asd_runtime asd_runtime;

ASD_API void asd_default_options(asd_options* options);

/* Loads and validates the engine. On failure *out is NULL and asd_last_error() says what to rebuild. */
ASD_API asd_status asd_create(const char* engine_dir, const asd_options* options, asd_runtime** out);
ASD_API void asd_destroy(asd_runtime* rt);

/* The prompt embedding [text_len, text_dim] (or [1, text_len, text_dim]) as float32, C order.
 * Setting a prompt restarts the stream (empty cache, noise generator reseeded with the options' seed). */
ASD_API asd_status asd_set_prompt_embedding(asd_runtime* rt, const float* data, int64_t numel);
ASD_API asd_status asd_set_prompt_embedding_file(asd_runtime* rt, const char* npy_path);
ASD_API asd_status asd_prompt_shape(const asd_runtime* rt, int64_t* text_len, int64_t* text_dim);

/* Restart the stream with a new seed, keeping the prompt. */
ASD_API asd_status asd_reset(asd_runtime* rt, uint64_t seed);

/* One chunk's clean latents [1, C, frames_per_chunk, h, w] (normalized, as the Python runtime's
 * generate() yields them). shape must hold 5 values. */
ASD_API asd_status asd_chunk_shape(const asd_runtime* rt, int64_t shape[5]);
ASD_API asd_status asd_chunk_numel(const asd_runtime* rt, int64_t* numel);
ASD_API asd_status asd_next_chunk(asd_runtime* rt, float* out, int64_t capacity);

/* Chunks generated since the last prompt or reset. */
ASD_API int64_t asd_chunks_done(const asd_runtime* rt);

/* Frames, from the decoder graphs that `python -m export.build` exports beside the DiT (unless
 * --decoder none): 1 when the engine has them. */
ASD_API int32_t asd_has_decoder(const asd_runtime* rt);
/* A frame's height and width, and the most frames one chunk decodes to (4 * frames_per_chunk). */
ASD_API asd_status asd_frame_shape(const asd_runtime* rt, int64_t* height, int64_t* width, int64_t* max_frames);
/* One chunk's latents (as asd_next_chunk wrote them, `numel` floats) -> uint8 RGB frames
 * [T, H, W, 3], C order, into `frames` (capacity >= max_frames * H * W * 3 bytes); T goes to
 * *num_frames: 1 + 4(Fc-1) for the first chunk after a prompt or reset, 4 Fc after. Decode the
 * chunks in order: the decoder carries its causal cache from one chunk to the next. */
ASD_API asd_status asd_decode_chunk(asd_runtime* rt, const float* latents, int64_t numel, uint8_t* frames,
                                    int64_t capacity, int64_t* num_frames);

/* The message of the last failed call on this thread ("" if none). Valid until the next call. */
ASD_API const char* asd_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* ASD_RUNTIME_H */
