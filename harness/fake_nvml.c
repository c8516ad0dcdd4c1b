/*
 * fake_nvml.c - a stand-in for NVIDIA's libnvidia-ml.so.1, for hive's tests.
 *
 * Built as a shared library named libnvidia-ml.so.1 and found through LD_LIBRARY_PATH, it is
 * loaded by the real pynvml binding (nvidia-ml-py) exactly as the real library would be, so the
 * code under test runs unchanged on a machine without a GPU.
 *
 * It describes the GPUs found in a text file named by the environment variable
 * FAKE_NVML_CONFIG. The file is read by nvmlInit and read again on every later call that asks
 * about a device, so a test can change the figures (or mark a GPU lost) while a daemon runs.
 * One record per line, '#' starts a comment, values may be double-quoted to hold spaces:
 *
 *   system driver=550.54.15 cuda=12040 init_error=0
 *   gpu index=0 name="NVIDIA H100 80GB HBM3" uuid=GPU-... bus=00000000:17:00.0
 *       total_mib=81920 used_mib=500 reserved_mib=0 util=12 mem_util=3 temp=40 power_mw=70000
 *       cpus=0-3,8 minor=0 lost=0 error=0 delay_ms=0 unsupported=power,temp fail=memory:999
 *   proc gpu=0 pid=1234 used_mib=2000        (used_mib=na: NVML_VALUE_NOT_AVAILABLE)
 *
 * (each gpu record on one line). total_bytes/used_bytes/reserved_bytes and used_bytes (proc)
 * give exact byte counts. `unsupported=` lists calls answering NVML_ERROR_NOT_SUPPORTED and
 * `fail=field:code` makes one call answer any code; the fields are name, uuid, pci, memory,
 * util, temp, power, affinity, processes, index, minor. `lost=1` makes every call on the GPU
 * answer NVML_ERROR_GPU_IS_LOST, `error=N` makes every call on it answer N, and `delay_ms=N`
 * makes every call on it take that long (a GPU falling off the bus can block NVML for seconds).
 * Without `cpus=` a GPU is local to every core of the machine.
 *
 * nvmlInit fails with NVML_ERROR_DRIVER_NOT_LOADED when FAKE_NVML_CONFIG is unset or its file is
 * missing, with NVML_ERROR_UNKNOWN when the file has an error (reported on stderr), and with the
 * code in FAKE_NVML_INIT_ERROR (environment) or `system init_error=` when either is non-zero.
 * The number of GPUs is fixed at nvmlInit, as in NVML: a gpu line removed later reads as lost.
 * Functions that are not implemented here are simply not exported, so pynvml raises
 * NVMLError_FunctionNotFound for them, as it does with an older driver.
 */

#include <ctype.h>
#include <stdint.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;
typedef struct fake_device *nvmlDevice_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

#define NVML_VALUE_NOT_AVAILABLE_ULL (~0ULL)
#define NVML_MEMORY_V2_VERSION (unsigned)(sizeof(nvmlMemory_v2_t) | (2u << 24))
#define MIB (1024ULL * 1024ULL)

#define MAX_GPUS 64
#define MAX_PROCS 512
#define MAX_CPUS 4096
#define LINE_MAX_LEN 4096

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

enum field {
    F_NAME,
    F_UUID,
    F_PCI,
    F_MEMORY,
    F_UTIL,
    F_TEMP,
    F_POWER,
    F_AFFINITY,
    F_PROCESSES,
    F_INDEX,
    F_MINOR,
    F_COUNT
};

static const char *const field_names[F_COUNT] = {
    "name", "uuid", "pci", "memory", "util", "temp",
    "power", "affinity", "processes", "index", "minor",
};

struct gpu {
    int present;
    char name[96];
    char uuid[96];
    char bus_id[32];
    unsigned domain, bus, device, pci_device_id, pci_subsystem_id;
    unsigned long long total, used, reserved;
    unsigned util, mem_util, temp, power_mw, minor;
    unsigned char cpus[MAX_CPUS / 8];
    int has_cpus;
    int lost;
    nvmlReturn_t error;
    nvmlReturn_t fail[F_COUNT];
    unsigned delay_ms;
};

struct proc {
    unsigned gpu;
    unsigned pid;
    unsigned long long used;
};

struct config {
    int ngpus;
    struct gpu gpus[MAX_GPUS];
    int nprocs;
    struct proc procs[MAX_PROCS];
    char driver[80];
    int cuda;
    nvmlReturn_t init_error;
};

struct fake_device {
    unsigned index;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int refcount;
static unsigned device_count;
static struct config current;
static struct config scratch;
static struct fake_device handles[MAX_GPUS];

/* -- parsing ---------------------------------------------------------------------------- */

enum { PARSE_OK = 0, PARSE_MISSING = -1, PARSE_INVALID = -2 };

static int parse_uint(const char *text, unsigned long long *out) {
    char *end;
    if (!*text) return -1;
    *out = strtoull(text, &end, 0);
    return *end ? -1 : 0;
}

static int parse_cpus(const char *text, struct gpu *g) {
    memset(g->cpus, 0, sizeof g->cpus);
    g->has_cpus = 1;
    if (!*text) return 0;
    const char *p = text;
    while (*p) {
        char *end;
        unsigned long lo = strtoul(p, &end, 10), hi = lo;
        if (end == p) return -1;
        p = end;
        if (*p == '-') {
            hi = strtoul(++p, &end, 10);
            if (end == p) return -1;
            p = end;
        }
        if (hi < lo || hi >= MAX_CPUS) return -1;
        for (unsigned long c = lo; c <= hi; c++) g->cpus[c / 8] |= (unsigned char)(1u << (c % 8));
        if (*p == ',') p++;
        else if (*p) return -1;
    }
    return 0;
}

static int field_index(const char *name, size_t len) {
    for (int f = 0; f < F_COUNT; f++)
        if (strlen(field_names[f]) == len && strncmp(field_names[f], name, len) == 0) return f;
    return -1;
}

/* "power,temp" -> NOT_SUPPORTED; with codes=1, "memory:999,temp:4" -> those codes. */
static int parse_fields(const char *text, struct gpu *g, int codes) {
    const char *p = text;
    while (*p) {
        const char *end = p + strcspn(p, ",");
        const char *colon = memchr(p, ':', (size_t)(end - p));
        size_t len = (size_t)((colon ? colon : end) - p);
        int f = field_index(p, len);
        if (f < 0) return -1;
        nvmlReturn_t code = NVML_ERROR_NOT_SUPPORTED;
        if (codes) {
            char buf[32];
            unsigned long long value;
            size_t n = colon ? (size_t)(end - colon - 1) : 0;
            if (!colon || n == 0 || n >= sizeof buf) return -1;
            memcpy(buf, colon + 1, n);
            buf[n] = 0;
            if (parse_uint(buf, &value)) return -1;
            code = (nvmlReturn_t)value;
        } else if (colon) {
            return -1;
        }
        g->fail[f] = code;
        p = *end ? end + 1 : end;
    }
    return 0;
}

static int copy_text(char *dest, size_t size, const char *value) {
    if (strlen(value) >= size) return -1;
    strcpy(dest, value);
    return 0;
}

static int parse_bus_id(struct gpu *g, const char *value) {
    unsigned domain, bus, device, function;
    if (copy_text(g->bus_id, sizeof g->bus_id, value)) return -1;
    if (sscanf(value, "%x:%x:%x.%x", &domain, &bus, &device, &function) != 4) return -1;
    g->domain = domain;
    g->bus = bus;
    g->device = device;
    return 0;
}

static void gpu_defaults(struct gpu *g, unsigned index) {
    memset(g, 0, sizeof *g);
    g->present = 1;
    snprintf(g->name, sizeof g->name, "NVIDIA Fake GPU");
    snprintf(g->uuid, sizeof g->uuid, "GPU-00000000-0000-0000-0000-%012x", index);
    snprintf(g->bus_id, sizeof g->bus_id, "00000000:%02X:00.0", 0x10 + index);
    g->bus = 0x10 + index;
    g->pci_device_id = 0x233010DE;
    g->pci_subsystem_id = 0x16C110DE;
    g->total = 81920ULL * MIB;
    g->minor = index;
}

static int gpu_key(struct gpu *g, const char *key, const char *value) {
    unsigned long long n = 0;
    int numeric = parse_uint(value, &n) == 0;
    if (!strcmp(key, "name")) return copy_text(g->name, sizeof g->name, value);
    if (!strcmp(key, "uuid")) return copy_text(g->uuid, sizeof g->uuid, value);
    if (!strcmp(key, "bus")) return parse_bus_id(g, value);
    if (!strcmp(key, "cpus")) return parse_cpus(value, g);
    if (!strcmp(key, "unsupported")) return parse_fields(value, g, 0);
    if (!strcmp(key, "fail")) return parse_fields(value, g, 1);
    if (!numeric) return -1;
    if (!strcmp(key, "total_mib")) g->total = n * MIB;
    else if (!strcmp(key, "used_mib")) g->used = n * MIB;
    else if (!strcmp(key, "reserved_mib")) g->reserved = n * MIB;
    else if (!strcmp(key, "total_bytes")) g->total = n;
    else if (!strcmp(key, "used_bytes")) g->used = n;
    else if (!strcmp(key, "reserved_bytes")) g->reserved = n;
    else if (!strcmp(key, "util")) g->util = (unsigned)n;
    else if (!strcmp(key, "mem_util")) g->mem_util = (unsigned)n;
    else if (!strcmp(key, "temp")) g->temp = (unsigned)n;
    else if (!strcmp(key, "power_mw")) g->power_mw = (unsigned)n;
    else if (!strcmp(key, "minor")) g->minor = (unsigned)n;
    else if (!strcmp(key, "lost")) g->lost = n != 0;
    else if (!strcmp(key, "error")) g->error = (nvmlReturn_t)n;
    else if (!strcmp(key, "delay_ms")) g->delay_ms = (unsigned)n;
    else if (!strcmp(key, "pci_device_id")) g->pci_device_id = (unsigned)n;
    else if (!strcmp(key, "pci_subsystem_id")) g->pci_subsystem_id = (unsigned)n;
    else return -1;
    return 0;
}

static int proc_key(struct proc *p, const char *key, const char *value) {
    unsigned long long n = 0;
    if (!strcmp(value, "na") && (!strcmp(key, "used_mib") || !strcmp(key, "used_bytes"))) {
        p->used = NVML_VALUE_NOT_AVAILABLE_ULL;
        return 0;
    }
    if (parse_uint(value, &n)) return -1;
    if (!strcmp(key, "gpu")) p->gpu = (unsigned)n;
    else if (!strcmp(key, "pid")) p->pid = (unsigned)n;
    else if (!strcmp(key, "used_mib")) p->used = n * MIB;
    else if (!strcmp(key, "used_bytes")) p->used = n;
    else return -1;
    return 0;
}

static int system_key(struct config *c, const char *key, const char *value) {
    unsigned long long n = 0;
    if (!strcmp(key, "driver")) return copy_text(c->driver, sizeof c->driver, value);
    if (parse_uint(value, &n)) return -1;
    if (!strcmp(key, "cuda")) c->cuda = (int)n;
    else if (!strcmp(key, "init_error")) c->init_error = (nvmlReturn_t)n;
    else return -1;
    return 0;
}

/* Split "key=value" or key="quoted value" off *cursor; 0 at the end of the line, -1 on error. */
static int next_pair(char **cursor, char **key, char **value) {
    char *p = *cursor;
    while (isspace((unsigned char)*p)) p++;
    if (!*p) return 0;
    *key = p;
    while (*p && *p != '=' && !isspace((unsigned char)*p)) p++;
    if (*p != '=') return -1;
    *p++ = 0;
    if (*p == '"') {
        *value = ++p;
        while (*p && *p != '"') p++;
        if (*p != '"') return -1;
        *p++ = 0;
        if (*p && !isspace((unsigned char)*p)) return -1;
    } else {
        *value = p;
        while (*p && !isspace((unsigned char)*p)) p++;
        if (*p) *p++ = 0;
    }
    *cursor = p;
    return 1;
}

static int parse_config(const char *path, struct config *c) {
    FILE *file = path ? fopen(path, "r") : NULL;
    if (!file) return PARSE_MISSING;
    memset(c, 0, sizeof *c);
    snprintf(c->driver, sizeof c->driver, "550.54.15");
    c->cuda = 12040;
    char line[LINE_MAX_LEN];
    int lineno = 0, status = PARSE_OK;
    unsigned next_index = 0;
    while (status == PARSE_OK && fgets(line, sizeof line, file)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char *p = line, *key, *value;
        while (isspace((unsigned char)*p)) p++;
        if (!*p) continue;
        char *kind = p;
        while (*p && !isspace((unsigned char)*p)) p++;
        if (*p) *p++ = 0;
        int r;
        char *keys[64], *values[64];
        int npairs = 0;
        while ((r = next_pair(&p, &key, &value)) == 1 && npairs < 64) {
            keys[npairs] = key;
            values[npairs++] = value;
        }
        if (r != 0) {
            fprintf(stderr, "fake_nvml: %s:%d: cannot parse this line\n", path, lineno);
            status = PARSE_INVALID;
            break;
        }
        if (!strcmp(kind, "gpu")) {
            struct gpu g;
            unsigned long long index = next_index;
            for (int i = 0; i < npairs; i++)
                if (!strcmp(keys[i], "index") && (parse_uint(values[i], &index) || index >= MAX_GPUS))
                    r = -1;
            if (r == 0 && c->gpus[index].present) r = -1;
            gpu_defaults(&g, (unsigned)index);
            for (int i = 0; i < npairs && r == 0; i++)
                if (strcmp(keys[i], "index") && gpu_key(&g, keys[i], values[i])) r = -1;
            if (r == 0) {
                c->gpus[index] = g;
                if ((int)index + 1 > c->ngpus) c->ngpus = (int)index + 1;
                next_index = (unsigned)index + 1;
            }
        } else if (!strcmp(kind, "proc")) {
            if (c->nprocs >= MAX_PROCS) {
                r = -1;
            } else {
                struct proc *pr = &c->procs[c->nprocs++];
                memset(pr, 0, sizeof *pr);
                for (int i = 0; i < npairs && r == 0; i++)
                    if (proc_key(pr, keys[i], values[i])) r = -1;
            }
        } else if (!strcmp(kind, "system")) {
            for (int i = 0; i < npairs && r == 0; i++)
                if (system_key(c, keys[i], values[i])) r = -1;
        } else {
            r = -1;
        }
        if (r < 0) {
            fprintf(stderr, "fake_nvml: %s:%d: cannot parse this line\n", path, lineno);
            status = PARSE_INVALID;
        }
    }
    fclose(file);
    return status;
}

/* -- state ------------------------------------------------------------------------------ */

/* Re-read the file; on any trouble keep what was read last (a test may be rewriting it). */
static void reload(void) {
    if (parse_config(getenv("FAKE_NVML_CONFIG"), &scratch) == PARSE_OK) current = scratch;
}

static void sleep_ms(unsigned ms) {
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) != 0) {
    }
}

static int handle_index(nvmlDevice_t device) {
    uintptr_t at = (uintptr_t)device, first = (uintptr_t)handles;
    if (at < first || (at - first) % sizeof *handles) return -1;
    uintptr_t index = (at - first) / sizeof *handles;
    return index < device_count ? (int)index : -1;
}

/* The state of one GPU, fresh from the file, and whether calls on it may go ahead. */
static nvmlReturn_t device_state(int index, struct gpu *out) {
    unsigned delay;
    nvmlReturn_t rc = NVML_SUCCESS;
    reload();
    *out = current.gpus[index];
    delay = out->delay_ms;
    pthread_mutex_unlock(&lock);
    if (delay) sleep_ms(delay);
    if (!out->present || out->lost) rc = NVML_ERROR_GPU_IS_LOST;
    else if (out->error) rc = out->error;
    return rc;
}

/* Validate the library state and the handle, then answer as device_state. Takes the lock. */
static nvmlReturn_t begin(nvmlDevice_t device, struct gpu *out, enum field f) {
    pthread_mutex_lock(&lock);
    if (!refcount) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    int index = handle_index(device);
    if (index < 0) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    nvmlReturn_t rc = device_state(index, out);
    if (rc == NVML_SUCCESS) rc = out->fail[f];
    return rc;
}

static nvmlReturn_t copy_out(char *dest, unsigned length, const char *value) {
    if (!dest) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dest, value, strlen(value) + 1);
    return NVML_SUCCESS;
}

/* -- library ---------------------------------------------------------------------------- */

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    const char *forced = getenv("FAKE_NVML_INIT_ERROR");
    if (forced && atoi(forced) != 0) return atoi(forced);
    pthread_mutex_lock(&lock);
    nvmlReturn_t rc = NVML_SUCCESS;
    if (refcount == 0) {
        int status = parse_config(getenv("FAKE_NVML_CONFIG"), &scratch);
        if (status == PARSE_MISSING) rc = NVML_ERROR_DRIVER_NOT_LOADED;
        else if (status != PARSE_OK) rc = NVML_ERROR_UNKNOWN;
        else if (scratch.init_error) rc = scratch.init_error;
        if (rc == NVML_SUCCESS) {
            current = scratch;
            device_count = (unsigned)current.ngpus;
            for (unsigned i = 0; i < MAX_GPUS; i++) handles[i].index = i;
        }
    }
    if (rc == NVML_SUCCESS) refcount++;
    pthread_mutex_unlock(&lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

EXPORT nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    nvmlReturn_t rc = refcount ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    if (refcount) refcount--;
    pthread_mutex_unlock(&lock);
    return rc;
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t system_text(char *dest, unsigned length, const char *prefix) {
    char text[96];
    pthread_mutex_lock(&lock);
    if (!refcount) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    snprintf(text, sizeof text, "%s%s", prefix, current.driver);
    pthread_mutex_unlock(&lock);
    return copy_out(dest, length, text);
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    return system_text(version, length, "");
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    return system_text(version, length, "12.");
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    nvmlReturn_t rc = refcount ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    if (refcount) *version = current.cuda;
    pthread_mutex_unlock(&lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) {
    return nvmlSystemGetCudaDriverVersion(version);
}

/* -- handles ---------------------------------------------------------------------------- */

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    nvmlReturn_t rc = refcount ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    if (refcount) *count = device_count;
    pthread_mutex_unlock(&lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

/* Hand out the handle of GPU `index` when calls on it may go ahead. Takes the lock. */
static nvmlReturn_t hand_out(int index, nvmlDevice_t *device) {
    struct gpu g;
    nvmlReturn_t rc = device_state(index, &g);
    if (rc == NVML_SUCCESS) *device = &handles[index];
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!device) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    if (!refcount || index >= device_count) {
        nvmlReturn_t rc = refcount ? NVML_ERROR_INVALID_ARGUMENT : NVML_ERROR_UNINITIALIZED;
        pthread_mutex_unlock(&lock);
        return rc;
    }
    return hand_out((int)index, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

/* Find a GPU by uuid (by_bus = 0) or PCI bus id, then hand out its handle. */
static nvmlReturn_t handle_by(const char *wanted, nvmlDevice_t *device, int by_bus) {
    if (!wanted || !device) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    if (!refcount) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    reload();
    for (unsigned i = 0; i < device_count; i++) {
        const struct gpu *g = &current.gpus[i];
        if (g->present && !(by_bus ? strcasecmp(g->bus_id, wanted) : strcmp(g->uuid, wanted)))
            return hand_out((int)i, device);
    }
    pthread_mutex_unlock(&lock);
    return NVML_ERROR_NOT_FOUND;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    return handle_by(uuid, device, 0);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *bus_id, nvmlDevice_t *device) {
    return handle_by(bus_id, device, 1);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *bus_id, nvmlDevice_t *device) {
    return handle_by(bus_id, device, 1);
}

/* -- device queries --------------------------------------------------------------------- */

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    struct gpu g;
    if (!index) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = begin(device, &g, F_INDEX);
    if (rc == NVML_SUCCESS) *index = (unsigned)(device - handles);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor) {
    struct gpu g;
    if (!minor) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = begin(device, &g, F_MINOR);
    if (rc == NVML_SUCCESS) *minor = g.minor;
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    struct gpu g;
    nvmlReturn_t rc = begin(device, &g, F_NAME);
    return rc == NVML_SUCCESS ? copy_out(name, length, g.name) : rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    struct gpu g;
    nvmlReturn_t rc = begin(device, &g, F_UUID);
    return rc == NVML_SUCCESS ? copy_out(uuid, length, g.uuid) : rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    struct gpu g;
    if (!pci) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = begin(device, &g, F_PCI);
    if (rc != NVML_SUCCESS) return rc;
    memset(pci, 0, sizeof *pci);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.0", g.domain & 0xFFFF,
             g.bus & 0xFF, g.device & 0xFF);
    snprintf(pci->busId, sizeof pci->busId, "%s", g.bus_id);
    pci->domain = g.domain;
    pci->bus = g.bus;
    pci->device = g.device;
    pci->pciDeviceId = g.pci_device_id;
    pci->pciSubSystemId = g.pci_subsystem_id;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

static unsigned long long left(const struct gpu *g) {
    unsigned long long taken = g->used + g->reserved;
    return taken >= g->total ? 0 : g->total - taken;
}

/* v1 counts the driver's reserved memory as used, as NVML does. */
EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    struct gpu g;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = begin(device, &g, F_MEMORY);
    if (rc != NVML_SUCCESS) return rc;
    memory->total = g.total;
    memory->free = left(&g);
    memory->used = g.total - memory->free;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    struct gpu g;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != NVML_MEMORY_V2_VERSION) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    nvmlReturn_t rc = begin(device, &g, F_MEMORY);
    if (rc != NVML_SUCCESS) return rc;
    memory->total = g.total;
    memory->reserved = g.reserved;
    memory->free = left(&g);
    memory->used = g.total - memory->free - (g.reserved > g.total ? g.total : g.reserved);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *util) {
    struct gpu g;
    if (!util) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = begin(device, &g, F_UTIL);
    if (rc != NVML_SUCCESS) return rc;
    util->gpu = g.util;
    util->memory = g.mem_util;
    return NVML_SUCCESS;
}

/* Only sensor 0, NVML_TEMPERATURE_GPU, exists. */
EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temp) {
    struct gpu g;
    if (!temp || sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = begin(device, &g, F_TEMP);
    if (rc == NVML_SUCCESS) *temp = g.temp;
    return rc;
}

typedef struct {
    unsigned int version;
    int sensorType;
    int temperature;
} nvmlTemperature_v1_t;

#define NVML_TEMPERATURE_V1_VERSION (unsigned)(sizeof(nvmlTemperature_v1_t) | (1u << 24))

EXPORT nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_v1_t *temp) {
    struct gpu g;
    if (!temp || temp->sensorType != 0) return NVML_ERROR_INVALID_ARGUMENT;
    if (temp->version != NVML_TEMPERATURE_V1_VERSION) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    nvmlReturn_t rc = begin(device, &g, F_TEMP);
    if (rc == NVML_SUCCESS) temp->temperature = (int)g.temp;
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    struct gpu g;
    if (!power) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = begin(device, &g, F_POWER);
    if (rc == NVML_SUCCESS) *power = g.power_mw;
    return rc;
}

/* The cores local to the GPU, as an array of cpu_set_size unsigned longs; none given: every
 * core this machine has. */
EXPORT nvmlReturn_t nvmlDeviceGetCpuAffinity(nvmlDevice_t device, unsigned int cpu_set_size,
                                             unsigned long *cpu_set) {
    struct gpu g;
    const unsigned bits = (unsigned)(8 * sizeof(unsigned long));
    if (!cpu_set || cpu_set_size == 0) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = begin(device, &g, F_AFFINITY);
    if (rc != NVML_SUCCESS) return rc;
    long cores = sysconf(_SC_NPROCESSORS_CONF);
    unsigned all = cores > 0 && cores < MAX_CPUS ? (unsigned)cores : 1;
    memset(cpu_set, 0, cpu_set_size * sizeof *cpu_set);
    for (unsigned c = 0; c < (g.has_cpus ? MAX_CPUS : all) && c / bits < cpu_set_size; c++)
        if (!g.has_cpus || g.cpus[c / 8] & (1u << (c % 8))) cpu_set[c / bits] |= 1UL << (c % bits);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                            unsigned int *count,
                                                            nvmlProcessInfo_t *infos) {
    struct gpu g;
    static nvmlProcessInfo_t found[MAX_PROCS];
    unsigned n = 0;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = begin(device, &g, F_PROCESSES);
    if (rc != NVML_SUCCESS) return rc;
    int index = (int)(device - handles);
    pthread_mutex_lock(&lock);
    for (int i = 0; i < current.nprocs; i++) {
        if (current.procs[i].gpu != (unsigned)index) continue;
        found[n].pid = current.procs[i].pid;
        found[n].usedGpuMemory = current.procs[i].used;
        found[n].gpuInstanceId = 0xFFFFFFFFu;
        found[n].computeInstanceId = 0xFFFFFFFFu;
        n++;
    }
    if (n > *count || (n && !infos)) {
        *count = n;
        rc = NVML_ERROR_INSUFFICIENT_SIZE;
    } else {
        if (n) memcpy(infos, found, n * sizeof *found);
        *count = n;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device,
                                                            unsigned int *count,
                                                            nvmlProcessInfo_t *infos) {
    return nvmlDeviceGetComputeRunningProcesses_v3(device, count, infos);
}
