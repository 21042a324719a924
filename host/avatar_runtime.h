/* avatar_runtime.h: the C ABI of the streaming avatar runtime, for hosts written in C, C++ or anything with an FFI.
 *
 * One session = one reference image + one live 16 kHz mono audio stream -> 25 fps RGB24 frames:
 *
 *     avatar_options opt = {.stream = "official", .seed = 0, .device = "cpu", .fit = "crop"};
 *     avatar_session* s = avatar_create_from_preset("tiny", "face.png", &opt);
 *     if (!s) { fprintf(stderr, "%s\n", avatar_last_error()); return 1; }
 *     avatar_push_audio(s, pcm, n);                       // any chunk size, float32 in [-1, 1], 16 kHz mono
 *     int w, h; avatar_frame_size(s, &w, &h);
 *     int64_t got = avatar_pull_frames(s, dst, max_frames); // dst: max_frames * h * w * 3 bytes
 *     avatar_flush(s);                                    // end of audio: the remaining frames become available
 *     avatar_destroy(s);
 *
 * Frame contract (the Python session's, unchanged): frame 0 is the reference reconstruction; frame v >= 1 is driven
 * by audio samples [640(v-1), 640v); a stream of S samples yields 1 + ceil(S / 640) frames in total, the same
 * frames whatever the chunking. A frame becomes available once the window that finalises it has run, i.e. after
 * (L - 1) blocks of look-ahead audio have been pushed (or at flush).
 *
 * Implementation: an embedded CPython interpreter running the repository's `runtime` package (the same code as
 * `python -m runtime.generate`), so results equal the Python API bit for bit. It is not a reimplementation and it
 * does not run exported ONNX/TensorRT artifacts.
 *
 * Errors: no function aborts or exits the host process. Functions returning `int` or `int64_t` return a value
 * >= 0 on success and a negative `avatar_status` on failure; the create functions return NULL on failure. After
 * a failure, `avatar_last_error()` gives the message (for runtime errors: "<PythonExceptionType>: <its message>").
 *
 * Ownership: a session is owned by the caller from create until `avatar_destroy`. Input buffers (pcm, strings) are
 * only read during the call and may be freed right after it. Output buffers are the caller's; the library writes
 * at most the byte count the call documents. The string from `avatar_last_error()` belongs to the library.
 *
 * Threading: any thread may call any function. The interpreter is started once (on the first create) and lives until
 * the process exits (torch does not support re-initialisation, so there is no shutdown call). Calls on one session
 * are serialised by a per-session mutex, so one session may be shared between, e.g., an audio thread pushing and a
 * video thread pulling. Different sessions may run on different threads; Python code between them is serialised
 * by the GIL, but torch releases the GIL inside its kernels, so they overlap there. `avatar_destroy` must not race
 * other calls on the same session. If the host process already runs Python (e.g. the library is loaded with
 * ctypes), that interpreter is used: it must be the same Python build the library was linked against, with the
 * runtime's dependencies importable, and the functions must be called without holding the GIL (ctypes.CDLL, not
 * ctypes.PyDLL: a caller holding the GIL while waiting for a session's mutex could deadlock).
 */
#ifndef AVATAR_RUNTIME_H
#define AVATAR_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define AVATAR_API __declspec(dllexport)
#else
#define AVATAR_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define AVATAR_ABI_VERSION 1
#define AVATAR_SAMPLE_RATE 16000 /* the only accepted input rate (Hz), mono */
#define AVATAR_FPS 25            /* output frame rate: one frame per 640 input samples */

typedef enum avatar_status {
    AVATAR_OK = 0,
    AVATAR_ERR_ARGUMENT = -1,  /* NULL pointer, bad value (the runtime's ValueError / TypeError) */
    AVATAR_ERR_NOT_FOUND = -2, /* a file or directory does not exist (FileNotFoundError) */
    AVATAR_ERR_STATE = -3,     /* call not allowed now, e.g. push after flush without reset (RuntimeError) */
    AVATAR_ERR_BUFFER = -4,    /* the output buffer is too small (avatar_stats_json) */
    AVATAR_ERR_PYTHON = -5,    /* the interpreter or the runtime package could not be started / imported */
    AVATAR_ERR_INTERNAL = -6   /* any other exception inside the runtime (the message names it) */
} avatar_status;

typedef struct avatar_session avatar_session; /* opaque */

/* Per-session options. Zero-initialise and set what you need; NULL strings mean the default. Fields are only
 * ever appended in later ABI versions. */
typedef struct avatar_options {
    const char* stream; /* stream preset: "official" (default), "relative", "low-delay" */
    const char* text;   /* text prompt (default ""); needs a text encoder or an embedding .safetensors path */
    const char* device; /* "cpu", "cuda", "cuda:1", ... (default: cuda when available, else cpu) */
    const char* dtype;  /* "float32", "bfloat16", "float16" (default: bfloat16 on cuda, float32 on cpu) */
    const char* fit;    /* image aspect differs from the model's: "error" (default) or "crop" (centre crop) */
    uint64_t seed;      /* noise seed; also the seed of any random-weight component (< 2^63) */
} avatar_options;

/* Last error message of the calling thread ("" if none). Valid until the next failing call on this thread. */
AVATAR_API const char* avatar_last_error(void);

/* A session on a named model preset with deterministic random weights ("tiny": 32x48 frames, for tests and
 * demos; "wan-1.3b": the full architecture). `image_path`: the reference image (png, jpg, ...). `opts` may be
 * NULL. Returns NULL on failure (unknown preset, missing or unreadable image, bad option, no interpreter). */
AVATAR_API avatar_session* avatar_create_from_preset(const char* preset, const char* image_path,
                                                     const avatar_options* opts);

/* A session on released weights: `weights_dir` in the official download layout (see the README, 'Real weights');
 * `preset` names the architecture (NULL: "wan-1.3b"). Components not found in the directory get random weights
 * and a warning on stderr, exactly as AvatarPipeline.from_pretrained. Returns NULL on failure. */
AVATAR_API avatar_session* avatar_create_from_weights(const char* weights_dir, const char* preset,
                                                      const char* image_path, const avatar_options* opts);

/* Append `n` float32 mono 16 kHz samples in [-1, 1] (n may be 0) and run every window the audio allows; the frames
 * they finalise are queued for avatar_pull_frames. Blocks for the compute. Returns AVATAR_OK or an error
 * (NaN/inf samples -> AVATAR_ERR_ARGUMENT; after avatar_flush -> AVATAR_ERR_STATE). */
AVATAR_API int avatar_push_audio(avatar_session* s, const float* pcm, size_t n);

/* End of audio: pad the last block with silence, run the remaining windows and queue the remaining frames.
 * At least one audio frame (640 samples) must have been pushed. Further pushes fail until avatar_reset. */
AVATAR_API int avatar_flush(avatar_session* s);

/* Start a new stream on the same reference image and seed; drops queued frames. */
AVATAR_API int avatar_reset(avatar_session* s);

/* Frames queued and not yet pulled (>= 0), or a negative avatar_status. */
AVATAR_API int64_t avatar_frames_available(avatar_session* s);

/* Frame width and height in pixels (a frame is height * width * 3 bytes, RGB24, rows top to bottom). */
AVATAR_API int avatar_frame_size(avatar_session* s, int* width, int* height);

/* Move up to `max_frames` queued frames, oldest first, into `dst` (frame-major: [frame][row][col][rgb], so `dst`
 * must hold max_frames * height * width * 3 bytes). Returns the number of frames copied (0 if none queued) or a
 * negative avatar_status. */
AVATAR_API int64_t avatar_pull_frames(avatar_session* s, uint8_t* dst, size_t max_frames);

/* Session statistics as one JSON object (frames_out, steps, per-stage ms, lookahead_frames, kv_bytes, device,
 * dtype, frames_queued, ...) written NUL-terminated into `buf`. If `len` is too small, writes a truncated
 * NUL-terminated prefix and returns AVATAR_ERR_BUFFER (the message gives the size needed). */
AVATAR_API int avatar_stats_json(avatar_session* s, char* buf, size_t len);

/* Free the session and its queued frames. NULL is a no-op. The pointer is invalid afterwards. */
AVATAR_API void avatar_destroy(avatar_session* s);

#ifdef __cplusplus
}
#endif

#endif /* AVATAR_RUNTIME_H */
