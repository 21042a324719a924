/* avatar_runtime.c: the C ABI of avatar_runtime.h over the Python runtime, through an embedded CPython.
 *
 * Every call takes the session's mutex, then the GIL, calls one method of host/avatar_host.py's HostSession with
 * plain arguments (strings, ints, memoryviews over the caller's buffers), and turns a Python exception into a
 * status code plus a thread-local message. Nothing here aborts: Python errors are fetched, never printed with
 * PyErr_Print (which would exit the process on SystemExit), and a failed interpreter start is reported, not fatal.
 *
 * Which interpreter: the one CMake found (the repo's .venv by default), baked in as AVATAR_PYTHON_EXECUTABLE
 * and used as the embedded interpreter's program name. CPython's path calculation then treats the embedded
 * interpreter exactly like that executable: it finds the venv's pyvenv.cfg next to it, so sys.prefix is the venv,
 * the base stdlib comes from the venv's `home`, and site adds the venv's site-packages. This keeps the build
 * pointing at one Python (no PYTHONHOME guessing, which breaks for venvs) and needs no environment variables.
 * The isolated config makes host-set PYTHONPATH/PYTHONHOME irrelevant. The repo root (for `runtime`) and host/
 * (for the glue) are put on sys.path from AVATAR_REPO_ROOT. Both are baked at configure time; the environment
 * variables AVATAR_PYTHON and AVATAR_REPO_ROOT override them for a relocated install.
 *
 * Not here: any model logic (all of it is the Python runtime's), and interpreter shutdown (see the header).
 */
#define _GNU_SOURCE /* dladdr */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "avatar_runtime.h"

#ifndef AVATAR_PYTHON_EXECUTABLE
#error "AVATAR_PYTHON_EXECUTABLE must name the Python executable whose packages the runtime uses (set by CMake)"
#endif
#ifndef AVATAR_REPO_ROOT
#error "AVATAR_REPO_ROOT must name the repository root holding runtime/ and host/ (set by CMake)"
#endif

#define MESSAGE_CAPACITY 4096 /* bytes kept of an error message; longer ones are truncated */

struct avatar_session {
    PyObject* obj;         /* avatar_host.HostSession */
    pthread_mutex_t lock;  /* serialises calls on this session; always taken before the GIL */
    int width, height;     /* cached at creation: frame_size needs no GIL */
};

static _Thread_local char last_error[MESSAGE_CAPACITY];

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int init_status = AVATAR_OK;
static char init_message[MESSAGE_CAPACITY];
static PyObject* host_session_type; /* avatar_host.HostSession, kept for the process lifetime */
static PyObject* state_error_type;  /* avatar_host.StateError */

/* ------------------------------------------------------------------------------------------- errors */

static void vformat(char* dst, const char* fmt, va_list ap) {
    vsnprintf(dst, MESSAGE_CAPACITY, fmt, ap);
}

static int fail(int status, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vformat(last_error, fmt, ap);
    va_end(ap);
    return status;
}

static int status_of(PyObject* type) {
    if (state_error_type && PyErr_GivenExceptionMatches(type, state_error_type)) return AVATAR_ERR_STATE;
    if (PyErr_GivenExceptionMatches(type, PyExc_FileNotFoundError)) return AVATAR_ERR_NOT_FOUND;
    if (PyErr_GivenExceptionMatches(type, PyExc_ValueError) || PyErr_GivenExceptionMatches(type, PyExc_TypeError))
        return AVATAR_ERR_ARGUMENT;
    return AVATAR_ERR_INTERNAL;
}

/* Take the pending Python exception (GIL held): write "Type: message" (after `prefix`) into dst, return a status. */
static int take_exception(char* dst, const char* prefix) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    int status = type ? status_of(type) : AVATAR_ERR_INTERNAL;
    PyObject* name = type ? PyObject_GetAttrString(type, "__name__") : NULL;
    PyObject* text = value ? PyObject_Str(value) : NULL;
    const char* name_s = name && PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
    const char* text_s = text ? PyUnicode_AsUTF8(text) : NULL;
    PyErr_Clear(); /* a failure while formatting must not leak into the next call */
    snprintf(dst, MESSAGE_CAPACITY, "%s%s%s%s", prefix, name_s ? name_s : "unknown Python error",
             text_s && *text_s ? ": " : "", text_s ? text_s : "");
    Py_XDECREF(name);
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return status;
}

/* The status of a finished method call (GIL held): AVATAR_OK, or the pending exception's. Consumes `result`. */
static int finish(PyObject* result) {
    if (result) {
        Py_DECREF(result);
        return AVATAR_OK;
    }
    return take_exception(last_error, "");
}

/* --------------------------------------------------------------------------------------- interpreter */

static const char* setting(const char* env, const char* baked) {
    const char* value = getenv(env);
    return value && *value ? value : baked;
}

/* Extension modules (torch, numpy) resolve Python symbols globally; a host that dlopen()s this library with
 * RTLD_LOCAL would hide libpython from them, so re-open it (already loaded: RTLD_NOLOAD) as RTLD_GLOBAL. */
static void make_libpython_global(void) {
    Dl_info info;
    if (dladdr((void*)&Py_InitializeFromConfig, &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
}

static int prepend_sys_path(const char* dir) {
    PyObject* path = PySys_GetObject("path"); /* borrowed */
    PyObject* entry = PyUnicode_DecodeFSDefault(dir);
    int rc = path && entry ? PySequence_Contains(path, entry) : -1;
    if (rc == 0) rc = PyList_Insert(path, 0, entry);
    Py_XDECREF(entry);
    return rc < 0 ? -1 : 0;
}

/* Put the repo on sys.path and import the glue (GIL held). Sets init_status / init_message on failure. */
static void load_glue(void) {
    const char* root = setting("AVATAR_REPO_ROOT", AVATAR_REPO_ROOT);
    char host_dir[MESSAGE_CAPACITY];
    snprintf(host_dir, sizeof host_dir, "%s/host", root);
    PyObject* module = NULL;
    if (prepend_sys_path(root) == 0 && prepend_sys_path(host_dir) == 0)
        module = PyImport_ImportModule("avatar_host");
    if (module) {
        host_session_type = PyObject_GetAttrString(module, "HostSession");
        state_error_type = PyObject_GetAttrString(module, "StateError");
        Py_DECREF(module);
    }
    if (!host_session_type || !state_error_type) {
        char prefix[MESSAGE_CAPACITY];
        snprintf(prefix, sizeof prefix, "cannot import the avatar runtime from %s (build with "
                 "-DPython3_EXECUTABLE=<repo>/.venv/bin/python, or set AVATAR_REPO_ROOT / AVATAR_PYTHON): ", root);
        take_exception(init_message, prefix);
        init_status = AVATAR_ERR_PYTHON;
    }
}

static void start_interpreter(void) {
    make_libpython_global();
    if (Py_IsInitialized()) { /* a Python host (e.g. ctypes): use its interpreter */
        PyGILState_STATE gil = PyGILState_Ensure();
        load_glue();
        PyGILState_Release(gil);
        return;
    }
    const char* exe = setting("AVATAR_PYTHON", AVATAR_PYTHON_EXECUTABLE);
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config); /* no PYTHON* env vars, no signal handlers, no argv parsing */
    PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, exe);
    if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st)) {
        snprintf(init_message, sizeof init_message, "cannot start the Python interpreter of %s: %s (set "
                 "AVATAR_PYTHON to a Python %d.%d executable)", exe, st.err_msg ? st.err_msg : "unknown error",
                 PY_MAJOR_VERSION, PY_MINOR_VERSION);
        init_status = AVATAR_ERR_PYTHON;
        return;
    }
    load_glue();
    PyEval_SaveThread(); /* release the GIL: every call takes it with PyGILState_Ensure, from any thread */
}

/* -------------------------------------------------------------------------------------------- sessions */

static avatar_session* create(const char* preset, const char* weights, const char* image_path,
                              const avatar_options* opts) {
    pthread_once(&init_once, start_interpreter);
    if (init_status != AVATAR_OK) {
        fail(init_status, "%s", init_message);
        return NULL;
    }
    static const avatar_options defaults = {0};
    const avatar_options* o = opts ? opts : &defaults;
    if (o->seed > INT64_MAX) { /* torch generators take signed 64-bit seeds */
        fail(AVATAR_ERR_ARGUMENT, "seed %llu is too large; use a seed below 2^63", (unsigned long long)o->seed);
        return NULL;
    }
    avatar_session* s = calloc(1, sizeof *s);
    if (!s) {
        fail(AVATAR_ERR_INTERNAL, "out of memory allocating a session");
        return NULL;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* args = PyTuple_New(0);
    /* "z": a NULL string becomes None (the default); "K": the seed as an unsigned 64-bit int */
    PyObject* kwargs = Py_BuildValue("{s:z,s:z,s:z,s:z,s:z,s:K,s:z,s:z,s:z}", "preset", preset, "weights", weights,
                                     "image", image_path, "stream", o->stream, "text", o->text, "seed",
                                     (unsigned long long)o->seed, "device", o->device, "dtype", o->dtype, "fit", o->fit);
    s->obj = args && kwargs ? PyObject_Call(host_session_type, args, kwargs) : NULL;
    PyObject* size = s->obj ? PyObject_CallMethod(s->obj, "frame_size", NULL) : NULL;
    int ok = size && PyArg_ParseTuple(size, "ii", &s->width, &s->height);
    if (!ok) take_exception(last_error, "");
    Py_XDECREF(size);
    Py_XDECREF(kwargs);
    Py_XDECREF(args);
    if (!ok) Py_CLEAR(s->obj);
    PyGILState_Release(gil);
    if (!ok) {
        free(s);
        return NULL;
    }
    pthread_mutex_init(&s->lock, NULL);
    return s;
}

AVATAR_API const char* avatar_last_error(void) { return last_error; }

AVATAR_API avatar_session* avatar_create_from_preset(const char* preset, const char* image_path,
                                                     const avatar_options* opts) {
    if (!preset) {
        fail(AVATAR_ERR_ARGUMENT, "avatar_create_from_preset: preset is NULL; pass a preset name such as \"tiny\"");
        return NULL;
    }
    return create(preset, NULL, image_path, opts);
}

AVATAR_API avatar_session* avatar_create_from_weights(const char* weights_dir, const char* preset,
                                                      const char* image_path, const avatar_options* opts) {
    if (!weights_dir) {
        fail(AVATAR_ERR_ARGUMENT, "avatar_create_from_weights: weights_dir is NULL; pass the weights directory");
        return NULL;
    }
    return create(preset, weights_dir, image_path, opts);
}

/* A session call: lock, GIL, `method(arg)` (arg may be NULL: no argument), GIL release, unlock. */
static int call(avatar_session* s, const char* method, PyObject* (*make_arg)(void*), void* ctx) {
    pthread_mutex_lock(&s->lock);
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* arg = make_arg ? make_arg(ctx) : NULL;
    int status;
    if (make_arg && !arg)
        status = take_exception(last_error, "");
    else
        status = finish(PyObject_CallMethod(s->obj, method, arg ? "O" : NULL, arg));
    Py_XDECREF(arg);
    PyGILState_Release(gil);
    pthread_mutex_unlock(&s->lock);
    return status;
}

struct pcm_view {
    const float* pcm;
    size_t n;
};

static PyObject* make_pcm_view(void* ctx) {
    static const float empty[1] = {0.0f}; /* a valid pointer for n == 0 */
    const struct pcm_view* v = ctx;
    return PyMemoryView_FromMemory((char*)(v->n ? v->pcm : empty), (Py_ssize_t)(v->n * sizeof(float)), PyBUF_READ);
}

AVATAR_API int avatar_push_audio(avatar_session* s, const float* pcm, size_t n) {
    if (!s) return fail(AVATAR_ERR_ARGUMENT, "avatar_push_audio: session is NULL");
    if (!pcm && n) return fail(AVATAR_ERR_ARGUMENT, "avatar_push_audio: pcm is NULL but n = %zu", n);
    if (n > (size_t)PY_SSIZE_T_MAX / sizeof(float))
        return fail(AVATAR_ERR_ARGUMENT, "avatar_push_audio: n = %zu samples is too large", n);
    struct pcm_view view = {pcm, n};
    return call(s, "push", make_pcm_view, &view);
}

AVATAR_API int avatar_flush(avatar_session* s) {
    if (!s) return fail(AVATAR_ERR_ARGUMENT, "avatar_flush: session is NULL");
    return call(s, "flush", NULL, NULL);
}

AVATAR_API int avatar_reset(avatar_session* s) {
    if (!s) return fail(AVATAR_ERR_ARGUMENT, "avatar_reset: session is NULL");
    return call(s, "reset", NULL, NULL);
}

AVATAR_API int avatar_frame_size(avatar_session* s, int* width, int* height) {
    if (!s || !width || !height) return fail(AVATAR_ERR_ARGUMENT, "avatar_frame_size: NULL argument");
    *width = s->width;
    *height = s->height;
    return AVATAR_OK;
}

AVATAR_API int64_t avatar_frames_available(avatar_session* s) {
    if (!s) return fail(AVATAR_ERR_ARGUMENT, "avatar_frames_available: session is NULL");
    pthread_mutex_lock(&s->lock);
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* queued = PyObject_GetAttrString(s->obj, "queued");
    int64_t n = queued ? PyLong_AsLongLong(queued) : -1;
    Py_XDECREF(queued);
    if (n < 0) n = take_exception(last_error, "");
    PyGILState_Release(gil);
    pthread_mutex_unlock(&s->lock);
    return n;
}

AVATAR_API int64_t avatar_pull_frames(avatar_session* s, uint8_t* dst, size_t max_frames) {
    if (!s) return fail(AVATAR_ERR_ARGUMENT, "avatar_pull_frames: session is NULL");
    if (max_frames == 0) return 0;
    if (!dst) return fail(AVATAR_ERR_ARGUMENT, "avatar_pull_frames: dst is NULL but max_frames = %zu", max_frames);
    size_t frame_bytes = (size_t)s->width * (size_t)s->height * 3;
    if (max_frames > (size_t)PY_SSIZE_T_MAX / frame_bytes)
        return fail(AVATAR_ERR_ARGUMENT, "avatar_pull_frames: max_frames = %zu is too large", max_frames);
    pthread_mutex_lock(&s->lock);
    PyGILState_STATE gil = PyGILState_Ensure();
    int64_t n = -1;
    PyObject* view = PyMemoryView_FromMemory((char*)dst, (Py_ssize_t)(max_frames * frame_bytes), PyBUF_WRITE);
    PyObject* copied = view ? PyObject_CallMethod(s->obj, "pull_into", "On", view, (Py_ssize_t)max_frames) : NULL;
    if (copied) n = PyLong_AsLongLong(copied);
    if (n < 0) n = take_exception(last_error, "");
    Py_XDECREF(copied);
    Py_XDECREF(view);
    PyGILState_Release(gil);
    pthread_mutex_unlock(&s->lock);
    return n;
}

AVATAR_API int avatar_stats_json(avatar_session* s, char* buf, size_t len) {
    if (!s || !buf || len == 0) return fail(AVATAR_ERR_ARGUMENT, "avatar_stats_json: NULL session or empty buffer");
    pthread_mutex_lock(&s->lock);
    PyGILState_STATE gil = PyGILState_Ensure();
    int status = AVATAR_OK;
    Py_ssize_t size = 0;
    PyObject* json = PyObject_CallMethod(s->obj, "stats_json", NULL);
    const char* text = json ? PyUnicode_AsUTF8AndSize(json, &size) : NULL;
    if (!text) {
        status = take_exception(last_error, "");
    } else {
        size_t keep = (size_t)size < len ? (size_t)size : len - 1;
        memcpy(buf, text, keep);
        buf[keep] = '\0';
        if (keep < (size_t)size)
            status = fail(AVATAR_ERR_BUFFER, "avatar_stats_json: buffer of %zu bytes is too small, %zd needed",
                          len, size + 1);
    }
    Py_XDECREF(json);
    PyGILState_Release(gil);
    pthread_mutex_unlock(&s->lock);
    return status;
}

AVATAR_API void avatar_destroy(avatar_session* s) {
    if (!s) return;
    if (Py_IsInitialized()) { /* a Python host may have finalised its interpreter already */
        PyGILState_STATE gil = PyGILState_Ensure();
        Py_CLEAR(s->obj);
        PyGILState_Release(gil);
    }
    pthread_mutex_destroy(&s->lock);
    free(s);
}
