/* host_demo.c: a C host streaming a speech wav through the avatar runtime's C ABI, chunk by chunk, as a live
 * caller would: push a chunk, pull whatever frames are ready, write them, repeat; then flush.
 *
 *     host_demo [--image PNG] [--audio WAV] [--out DIR] [--preset tiny | --weights DIR [--preset NAME]]
 *               [--stream official] [--seed 0] [--device cpu] [--fit crop|error] [--chunk-ms 200] [--ppm]
 *
 * With no --image/--audio it streams the sample shipped in runtime/assets/sample (the square sample face is
 * centre-cropped, as `python -m runtime.generate` does). Output in DIR (default host_demo_out):
 *   frames.rgb   all frames, RGB24, frame-major ([T][H][W][3] bytes)
 *   frames.json  what was run (inputs, chunking, seed, resolved device/dtype via the session stats) and T, W, H;
 *                tests/host_check.py reads it to rerun the same stream in Python and compare
 *   frame_NNNNN.ppm  one image per frame with --ppm
 * The wav must be 16-bit PCM, mono, 16 kHz (the runtime's input format); it is read here, not by the library,
 * to show a host feeding its own samples. Exit code 0 on success, 1 with a message on any error.
 *
 * Not here: resampling, other audio formats, mp4 writing (use `python -m runtime.generate` for an mp4).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "avatar_runtime.h"

#ifndef AVATAR_SAMPLE_DIR
#error "AVATAR_SAMPLE_DIR must name the directory holding the shipped sample (set by CMake)"
#endif

#define PULL_BATCH 64        /* frames pulled per avatar_pull_frames call */
#define STATS_CAPACITY 8192  /* bytes for the stats JSON */
#define PATH_CAPACITY 4096

typedef struct demo_args {
    const char *image, *audio, *out, *preset, *weights, *stream, *device, *fit;
    uint64_t seed;
    double chunk_ms;
    int ppm;
} demo_args;

static int die(const char* what, const char* detail) {
    fprintf(stderr, "host_demo: %s%s%s\n", what, detail && *detail ? ": " : "", detail ? detail : "");
    return 1;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------------------------------- wav */

static uint32_t le32(const unsigned char* p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t le16(const unsigned char* p) { return (uint16_t)(p[0] | p[1] << 8); }

static unsigned char* read_file(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    if (!f) return NULL;
    unsigned char* data = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        rewind(f);
        data = n >= 0 ? malloc((size_t)n + 1) : NULL;
        if (data && fread(data, 1, (size_t)n, f) != (size_t)n) {
            free(data);
            data = NULL;
        }
        *size = (size_t)n;
    }
    fclose(f);
    return data;
}

/* 16-bit PCM mono 16 kHz wav -> float32 samples x / 32768 (exact, as FFmpeg's s16 -> flt). NULL + message on error. */
static float* read_wav(const char* path, size_t* count, const char** error) {
    size_t size = 0;
    unsigned char* data = read_file(path, &size);
    if (!data) return *error = strerror(errno), NULL;
    const unsigned char* fmt = NULL;
    const unsigned char* pcm = NULL;
    size_t pcm_bytes = 0;
    if (size < 12 || memcmp(data, "RIFF", 4) || memcmp(data + 8, "WAVE", 4)) *error = "not a RIFF/WAVE file";
    for (size_t at = 12; !*error && at + 8 <= size;) {   /* chunks: id, size, payload padded to even */
        size_t len = le32(data + at + 4), body = at + 8;
        if (len > size - body) len = size - body;      /* a truncated last chunk: keep what is there */
        if (!memcmp(data + at, "fmt ", 4) && len >= 16) fmt = data + body;
        if (!memcmp(data + at, "data", 4)) pcm = data + body, pcm_bytes = len;
        at = body + len + (len & 1);
    }
    if (!*error && (!fmt || !pcm)) *error = "no fmt or data chunk";
    if (!*error && (le16(fmt) != 1 || le16(fmt + 2) != 1 || le32(fmt + 4) != AVATAR_SAMPLE_RATE || le16(fmt + 14) != 16))
        *error = "expected 16-bit PCM, mono, 16 kHz (convert: ffmpeg -i IN -ac 1 -ar 16000 -c:a pcm_s16le OUT.wav)";
    float* samples = NULL;
    if (!*error) {
        *count = pcm_bytes / 2;
        samples = malloc((*count ? *count : 1) * sizeof(float));
        for (size_t i = 0; samples && i < *count; i++) samples[i] = (int16_t)le16(pcm + 2 * i) / 32768.0f;
        if (!samples) *error = "out of memory";
    }
    free(data);
    return samples;
}

/* ------------------------------------------------------------------------------------------- output */

static int write_ppm(const char* dir, int64_t index, const uint8_t* rgb, int w, int h) {
    char path[PATH_CAPACITY];
    snprintf(path, sizeof path, "%s/frame_%05lld.ppm", dir, (long long)index);
    FILE* f = fopen(path, "wb");
    if (!f) return -1;
    fprintf(f, "P6\n%d %d\n255\n", w, h);
    size_t n = fwrite(rgb, 1, (size_t)w * h * 3, f);
    return fclose(f) == 0 && n == (size_t)w * h * 3 ? 0 : -1;
}

/* Pull every ready frame into `raw` (and PPMs); returns frames written or a negative status. */
static int64_t drain(avatar_session* s, FILE* raw, uint8_t* buf, const demo_args* a, int64_t written) {
    int w, h;
    avatar_frame_size(s, &w, &h);
    size_t frame_bytes = (size_t)w * h * 3;
    int64_t total = 0, got;
    while ((got = avatar_pull_frames(s, buf, PULL_BATCH)) > 0) {
        if (fwrite(buf, frame_bytes, (size_t)got, raw) != (size_t)got) return AVATAR_ERR_INTERNAL;
        for (int64_t i = 0; a->ppm && i < got; i++)
            if (write_ppm(a->out, written + total + i, buf + i * frame_bytes, w, h)) return AVATAR_ERR_INTERNAL;
        total += got;
    }
    return got < 0 ? got : total;
}

static void json_string(FILE* f, const char* key, const char* value) {
    fprintf(f, "  \"%s\": ", key);
    if (!value) {
        fputs("null,\n", f);
        return;
    }
    fputc('"', f);
    for (const char* c = value; *c; c++) {
        if (*c == '"' || *c == '\\') fputc('\\', f);
        if ((unsigned char)*c >= 0x20) fputc(*c, f);
    }
    fputs("\",\n", f);
}

static int write_meta(const demo_args* a, size_t chunk, size_t samples, int64_t frames, int w, int h,
                      const char* stats) {
    char path[PATH_CAPACITY];
    snprintf(path, sizeof path, "%s/frames.json", a->out);
    FILE* f = fopen(path, "w");
    if (!f) return -1;
    fputs("{\n", f);
    json_string(f, "image", a->image);
    json_string(f, "audio", a->audio);
    json_string(f, "preset", a->preset);
    json_string(f, "weights", a->weights);
    json_string(f, "stream", a->stream);
    json_string(f, "fit", a->fit);
    fprintf(f, "  \"seed\": %llu,\n  \"chunk_samples\": %zu,\n  \"samples\": %zu,\n", (unsigned long long)a->seed,
            chunk, samples);
    fprintf(f, "  \"frames\": %lld,\n  \"width\": %d,\n  \"height\": %d,\n  \"raw\": \"frames.rgb\",\n",
            (long long)frames, w, h);
    fprintf(f, "  \"stats\": %s\n}\n", stats);
    return fclose(f);
}

/* ------------------------------------------------------------------------------------------- main */

static int parse_args(int argc, char** argv, demo_args* a) {
    static char image[PATH_CAPACITY], audio[PATH_CAPACITY];
    snprintf(image, sizeof image, "%s/face.png", AVATAR_SAMPLE_DIR);
    snprintf(audio, sizeof audio, "%s/speech.wav", AVATAR_SAMPLE_DIR);
    *a = (demo_args){.image = image, .audio = audio, .out = "host_demo_out", .stream = "official",
                     .chunk_ms = 200.0, .fit = NULL};
    int own_image = 0;
    for (int i = 1; i < argc; i++) {
        const char* key = argv[i];
        if (!strcmp(key, "--ppm")) { a->ppm = 1; continue; }
        if (i + 1 >= argc) return die("missing value for", key);
        const char* v = argv[++i];
        if (!strcmp(key, "--image")) a->image = v, own_image = 1;
        else if (!strcmp(key, "--audio")) a->audio = v;
        else if (!strcmp(key, "--out")) a->out = v;
        else if (!strcmp(key, "--preset")) a->preset = v;
        else if (!strcmp(key, "--weights")) a->weights = v;
        else if (!strcmp(key, "--stream")) a->stream = v;
        else if (!strcmp(key, "--device")) a->device = v;
        else if (!strcmp(key, "--fit")) a->fit = v;
        else if (!strcmp(key, "--seed")) a->seed = strtoull(v, NULL, 10);
        else if (!strcmp(key, "--chunk-ms")) a->chunk_ms = atof(v);
        else return die("unknown option (see the top of examples/host_demo.c)", key);
    }
    if (!a->fit) a->fit = own_image ? "error" : "crop";   /* the shipped sample is square: crop it */
    if (!a->preset && !a->weights) a->preset = "tiny";
    if (a->chunk_ms <= 0) return die("--chunk-ms must be positive", NULL);
    return 0;
}

int main(int argc, char** argv) {
    demo_args a;
    if (parse_args(argc, argv, &a)) return 1;
    const char* wav_error = NULL;
    size_t samples = 0;
    float* pcm = read_wav(a.audio, &samples, &wav_error);
    if (!pcm) return die(a.audio, wav_error);
    if (mkdir(a.out, 0755) && errno != EEXIST) return die(a.out, strerror(errno));

    double t0 = now_s();
    avatar_options opt = {.stream = a.stream, .device = a.device, .fit = a.fit, .seed = a.seed};
    avatar_session* s = a.weights ? avatar_create_from_weights(a.weights, a.preset, a.image, &opt)
                                  : avatar_create_from_preset(a.preset, a.image, &opt);
    if (!s) return die("cannot create the session", avatar_last_error());
    double t1 = now_s();

    int w, h;
    avatar_frame_size(s, &w, &h);
    char path[PATH_CAPACITY];
    snprintf(path, sizeof path, "%s/frames.rgb", a.out);
    FILE* raw = fopen(path, "wb");
    uint8_t* buf = malloc((size_t)PULL_BATCH * w * h * 3);
    if (!raw || !buf) return die(path, "cannot open or allocate the output");

    size_t chunk = (size_t)(a.chunk_ms * AVATAR_SAMPLE_RATE / 1000.0);
    if (chunk == 0) chunk = 1;
    int64_t frames = 0, got = 0;
    for (size_t at = 0; at < samples && got >= 0; at += chunk) {
        size_t n = samples - at < chunk ? samples - at : chunk;
        if (avatar_push_audio(s, pcm + at, n) != AVATAR_OK) return die("push failed", avatar_last_error());
        if ((got = drain(s, raw, buf, &a, frames)) >= 0) frames += got;
    }
    if (got >= 0 && avatar_flush(s) != AVATAR_OK) return die("flush failed", avatar_last_error());
    if (got >= 0 && (got = drain(s, raw, buf, &a, frames)) >= 0) frames += got;
    if (got < 0) return die("pulling frames failed", avatar_last_error());
    if (fclose(raw)) return die(path, strerror(errno));
    double t2 = now_s();

    char stats[STATS_CAPACITY];
    if (avatar_stats_json(s, stats, sizeof stats) != AVATAR_OK) return die("stats failed", avatar_last_error());
    if (write_meta(&a, chunk, samples, frames, w, h, stats)) return die("cannot write frames.json in", a.out);
    printf("host_demo: %lld frames %dx%d from %.2f s of audio in %zu-sample chunks -> %s/frames.rgb\n",
           (long long)frames, w, h, samples / (double)AVATAR_SAMPLE_RATE, chunk, a.out);
    printf("host_demo: session start %.2f s, streaming %.2f s (%.1f ms/frame)\n", t1 - t0, t2 - t1,
           frames ? 1e3 * (t2 - t1) / frames : 0.0);
    printf("host_demo: stats %s\n", stats);
    avatar_destroy(s);
    free(buf);
    free(pcm);
    return 0;
}
