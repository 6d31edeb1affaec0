/* Byte loops for reading references: one pass each over a block, no Python object per key.
 *
 * Optional accelerator: heimdall_storage_pipeline/core/native.py falls back to numpy versions
 * with the same results when this module is not built. Every function takes Arrow-style
 * int32 offsets and a data buffer, and releases the GIL while it loops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

#define PRIME 0x100000001B3ULL
#define GOLDEN 0x9E3779B97F4A7C15ULL

#define POWERS 1024 /* S3 keys are at most 1024 bytes: longer ones continue the powers in the loop */
static uint64_t powers[POWERS]; /* PRIME**i mod 2**64, filled when the module loads */

static uint64_t fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xFF51AFD7ED558CCDULL;
    k ^= k >> 33;
    k *= 0xC4CEB9FE1A85EC53ULL;
    k ^= k >> 33;
    return k;
}

/* split_rows(block, end, offsets_out, data_out) -> (rows, data_length)
 * Rows of block[:end], each ended by '\n': their bytes without the newlines go to data_out,
 * Arrow offsets (rows + 1 of them) to offsets_out. */
static PyObject *split_rows(PyObject *self, PyObject *args) {
    Py_buffer block, offsets, data;
    Py_ssize_t end;
    if (!PyArg_ParseTuple(args, "y*nw*w*", &block, &end, &offsets, &data)) return NULL;
    Py_ssize_t rows = 0, length = 0;
    int ok = end <= block.len && data.len >= end && offsets.len >= (Py_ssize_t)sizeof(int32_t);
    if (ok) {
        const char *src = block.buf;
        char *dst = data.buf;
        int32_t *out = offsets.buf;
        Py_ssize_t capacity = offsets.len / (Py_ssize_t)sizeof(int32_t);
        Py_BEGIN_ALLOW_THREADS
        Py_ssize_t start = 0;
        out[0] = 0;
        while (start < end) {
            const char *newline = memchr(src + start, '\n', (size_t)(end - start));
            Py_ssize_t stop = newline ? newline - src : end;
            if (rows + 2 > capacity) { ok = 0; break; }
            memcpy(dst + length, src + start, (size_t)(stop - start));
            length += stop - start;
            out[++rows] = (int32_t)length;
            start = stop + 1;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&block);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "split_rows: output buffers too small");
        return NULL;
    }
    return Py_BuildValue("nn", rows, length);
}

/* needs_work(offsets, data, rows, skip, extra) -> index of the first value whose bytes after
 * the first `skip` are empty, start with '/' or '.', contain "//", "/.", a control character
 * or a byte of `extra`; -1 if none. A superset of keys.NEEDS_NORMALISATION_PATTERN. */
static PyObject *needs_work(PyObject *self, PyObject *args) {
    Py_buffer offsets, data, extra;
    Py_ssize_t rows, skip;
    if (!PyArg_ParseTuple(args, "y*y*nny*", &offsets, &data, &rows, &skip, &extra)) return NULL;
    Py_ssize_t found = -1;
    if (offsets.len < (rows + 1) * (Py_ssize_t)sizeof(int32_t)) {
        PyBuffer_Release(&offsets); PyBuffer_Release(&data); PyBuffer_Release(&extra);
        PyErr_SetString(PyExc_ValueError, "needs_work: offsets too short");
        return NULL;
    }
    const int32_t *off = offsets.buf;
    const unsigned char *bytes = data.buf;
    unsigned char special[256] = {0};
    for (int c = 0; c < 0x20; c++) special[c] = 1;
    special[0x7f] = 1;
    for (Py_ssize_t i = 0; i < extra.len; i++) special[((unsigned char *)extra.buf)[i]] = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t row = 0; row < rows && found < 0; row++) {
        Py_ssize_t first = off[row] + skip, last = off[row + 1];
        if (first >= last || bytes[first] == '/' || bytes[first] == '.') { found = row; break; }
        for (Py_ssize_t i = first; i < last; i++) {
            unsigned char c = bytes[i];
            if (special[c] || (c == '/' && i + 1 < last && (bytes[i + 1] == '/' || bytes[i + 1] == '.'))) {
                found = row;
                break;
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    PyBuffer_Release(&extra);
    return PyLong_FromSsize_t(found);
}

/* hash64(offsets, data, rows, out): the same 64-bit hash as hashing.hash_strings64. */
static PyObject *hash64(PyObject *self, PyObject *args) {
    Py_buffer offsets, data, out;
    Py_ssize_t rows;
    if (!PyArg_ParseTuple(args, "y*y*nw*", &offsets, &data, &rows, &out)) return NULL;
    int ok = offsets.len >= (rows + 1) * (Py_ssize_t)sizeof(int32_t) && out.len >= rows * (Py_ssize_t)sizeof(uint64_t);
    if (ok) {
        const int32_t *off = offsets.buf;
        const unsigned char *bytes = data.buf;
        uint64_t *hashes = out.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t row = 0; row < rows; row++) {
            const unsigned char *key = bytes + off[row];
            int32_t length = off[row + 1] - off[row], head = length < POWERS ? length : POWERS;
            uint64_t h = 0, power = powers[POWERS - 1] * PRIME;
            /* Independent multiply-adds from the table (no chain of multiplies through the key). */
            for (int32_t i = 0; i < head; i++) h += (uint64_t)key[i] * powers[i];
            for (int32_t i = head; i < length; i++, power *= PRIME) h += (uint64_t)key[i] * power;
            h += (uint64_t)length * GOLDEN;
            hashes[row] = fmix64(h);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "hash64: buffers too short");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Scans one JSON string body from text[i] (just after its opening quote); returns the index of
 * the closing quote, or -1 if the string holds a backslash or does not end before `end`. */
static Py_ssize_t plain_string_end(const unsigned char *text, Py_ssize_t i, Py_ssize_t end) {
    for (; i < end; i++) {
        if (text[i] == '"') return i;
        if (text[i] == '\\') return -1;
    }
    return -1;
}

/* object_values(offsets, data, rows, values_offsets_out, values_data_out, members_out)
 *     -> (values, values_length)
 * For each row in jsonb's canonical form {"k": "v", "k2": "v2"} whose keys and values hold no
 * backslash: its member values, in order, appended to the outputs, and members_out[row] = their
 * number. Any other row: members_out[row] = -1 and nothing appended. */
static PyObject *object_values(PyObject *self, PyObject *args) {
    Py_buffer offsets, data, value_offsets, value_data, members;
    Py_ssize_t rows;
    if (!PyArg_ParseTuple(args, "y*y*nw*w*w*", &offsets, &data, &rows, &value_offsets, &value_data, &members))
        return NULL;
    int ok = offsets.len >= (rows + 1) * (Py_ssize_t)sizeof(int32_t) && members.len >= rows * (Py_ssize_t)sizeof(int32_t)
             && value_data.len >= data.len && value_offsets.len >= (Py_ssize_t)sizeof(int32_t);
    Py_ssize_t values = 0, length = 0;
    if (ok) {
        const int32_t *off = offsets.buf;
        const unsigned char *text = data.buf;
        unsigned char *dst = value_data.buf;
        int32_t *out = value_offsets.buf, *count = members.buf;
        Py_ssize_t capacity = value_offsets.len / (Py_ssize_t)sizeof(int32_t);
        Py_BEGIN_ALLOW_THREADS
        out[0] = 0;
        for (Py_ssize_t row = 0; row < rows && ok; row++) {
            Py_ssize_t i = off[row], end = off[row + 1], first_value = values, first_length = length;
            int32_t found = -1;
            if (end - i >= 2 && text[i] == '{' && text[end - 1] == '}') {
                i++;
                found = 0;
                if (i == end - 1) i = end; /* {} */
                while (i < end) {
                    Py_ssize_t key_end, value_start, value_end;
                    if (text[i] != '"' || (key_end = plain_string_end(text, i + 1, end)) < 0
                        || key_end + 4 >= end || memcmp(text + key_end + 1, ": \"", 3) != 0
                        || (value_end = plain_string_end(text, value_start = key_end + 4, end)) < 0) {
                        found = -1;
                        break;
                    }
                    if (values + 2 > capacity) { ok = 0; break; }
                    memcpy(dst + length, text + value_start, (size_t)(value_end - value_start));
                    length += value_end - value_start;
                    out[++values] = (int32_t)length;
                    found++;
                    if (value_end + 1 == end - 1) { i = end; break; } /* the closing brace */
                    if (value_end + 3 >= end || memcmp(text + value_end + 1, ", ", 2) != 0) { found = -1; break; }
                    i = value_end + 3;
                }
            }
            if (found < 0) { values = first_value; length = first_length; } /* drop a partial row */
            count[row] = found;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    PyBuffer_Release(&value_offsets);
    PyBuffer_Release(&value_data);
    PyBuffer_Release(&members);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "object_values: buffers too small");
        return NULL;
    }
    return Py_BuildValue("nn", values, length);
}

/* plain_keys(block, end, prefix, extra, offsets_out, data_out, hashes_out) -> rows, or -1
 * The usual block of a reference read in one pass: when every newline-ended row of block[:end]
 * is `prefix` followed by a key that needs_work passes (no backslash, so no COPY escape or
 * NULL, and no byte of `extra`), the keys without the prefix go to data_out with their Arrow
 * offsets and their hash64 to hashes_out, and the row count is returned. -1 as soon as a row
 * is not such a value: the caller then takes the general path for the whole block. */
static PyObject *plain_keys(PyObject *self, PyObject *args) {
    Py_buffer block, prefix, extra, offsets, data, hashes_out;
    Py_ssize_t end;
    if (!PyArg_ParseTuple(args, "y*ny*y*w*w*w*", &block, &end, &prefix, &extra, &offsets, &data, &hashes_out))
        return NULL;
    Py_ssize_t rows = 0;
    Py_ssize_t capacity = offsets.len / (Py_ssize_t)sizeof(int32_t);
    int fits = end <= block.len && data.len >= end && capacity >= 1
               && hashes_out.len / (Py_ssize_t)sizeof(uint64_t) >= capacity - 1;
    if (fits) {
        unsigned char special[256] = {0};
        for (int c = 0; c < 0x20; c++) special[c] = 1;
        special[0x7f] = 1;
        special['\\'] = 1;
        for (Py_ssize_t i = 0; i < extra.len; i++) special[((unsigned char *)extra.buf)[i]] = 1;
        const unsigned char *src = block.buf, *pre = prefix.buf;
        unsigned char *dst = data.buf;
        int32_t *out = offsets.buf;
        uint64_t *hashes = hashes_out.buf;
        Py_ssize_t skip = prefix.len, length = 0, start = 0;
        Py_BEGIN_ALLOW_THREADS
        out[0] = 0;
        while (start < end) {
            const unsigned char *newline = memchr(src + start, '\n', (size_t)(end - start));
            Py_ssize_t stop = newline ? newline - src : end;
            const unsigned char *key = src + start + skip;
            Py_ssize_t size = stop - start - skip;
            if (rows + 2 > capacity || size <= 0 || memcmp(src + start, pre, (size_t)skip) != 0
                || key[0] == '/' || key[0] == '.') { rows = -1; break; }
            uint64_t h = 0, power = powers[POWERS - 1] * PRIME;
            Py_ssize_t i = 0;
            for (; i < size; i++) {
                unsigned char c = key[i];
                if (special[c] || (c == '/' && i + 1 < size && (key[i + 1] == '/' || key[i + 1] == '.'))) break;
                if (i < POWERS) h += (uint64_t)c * powers[i];
                else { h += (uint64_t)c * power; power *= PRIME; }
            }
            if (i < size) { rows = -1; break; }
            h += (uint64_t)size * GOLDEN;
            hashes[rows] = fmix64(h);
            memcpy(dst + length, key, (size_t)size);
            length += size;
            out[++rows] = (int32_t)length;
            start = stop + 1;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&block);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&extra);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    PyBuffer_Release(&hashes_out);
    if (!fits) {
        PyErr_SetString(PyExc_ValueError, "plain_keys: output buffers too small");
        return NULL;
    }
    return PyLong_FromSsize_t(rows);
}

/* --- COPY ... TO STDOUT without a Python call per row ----------------------------------------
 * psycopg2's copy_expert calls the sink's write() once per row, under the GIL: ~0.4 us a row,
 * a second core's worth next to the PostgreSQL backend that produces the rows, which the
 * reader's own work then has to share. This runs the same libpq loop in C with the GIL
 * released (~0.13 us a row) and copies the rows straight into blocks for the caller.
 * The PGconn is psycopg2's (connection.pgconn_ptr, documented for passing to C code), so the
 * functions are looked up in the libpq that psycopg2's own module loaded: a PGconn must only
 * meet the libpq build that created it. */

typedef struct pg_conn PGconn;
typedef struct pg_result PGresult;

/* libpq's enum values (stable ABI) */
#define PGRES_COPY_OUT 3
#define PGRES_BAD_RESPONSE 5
#define PGRES_FATAL_ERROR 7
#define CONNECTION_OK 0
#define PG_DIAG_SQLSTATE 'C'

struct libpq {
    PGresult *(*exec)(PGconn *, const char *);
    int (*result_status)(const PGresult *);
    char *(*result_error_message)(const PGresult *);
    char *(*result_error_field)(const PGresult *, int);
    void (*clear)(PGresult *);
    int (*get_copy_data)(PGconn *, char **, int);
    void (*freemem)(void *);
    PGresult *(*get_result)(PGconn *);
    char *(*error_message)(const PGconn *);
    int (*status)(const PGconn *);
    int (*is_nonblocking)(const PGconn *);
};

static int load_libpq(const char *library, struct libpq *pq) {
    /* RTLD_NOLOAD: only a library this process has already loaded; dlsym on its handle also
     * searches the libraries it depends on, which is where psycopg2's libpq sits. */
    void *handle = dlopen(library, RTLD_LAZY | RTLD_NOLOAD);
    if (handle == NULL) return 0;
    *(void **)&pq->exec = dlsym(handle, "PQexec");
    *(void **)&pq->result_status = dlsym(handle, "PQresultStatus");
    *(void **)&pq->result_error_message = dlsym(handle, "PQresultErrorMessage");
    *(void **)&pq->result_error_field = dlsym(handle, "PQresultErrorField");
    *(void **)&pq->clear = dlsym(handle, "PQclear");
    *(void **)&pq->get_copy_data = dlsym(handle, "PQgetCopyData");
    *(void **)&pq->freemem = dlsym(handle, "PQfreemem");
    *(void **)&pq->get_result = dlsym(handle, "PQgetResult");
    *(void **)&pq->error_message = dlsym(handle, "PQerrorMessage");
    *(void **)&pq->status = dlsym(handle, "PQstatus");
    *(void **)&pq->is_nonblocking = dlsym(handle, "PQisnonblocking");
    dlclose(handle); /* psycopg2's module keeps the library loaded */
    return pq->exec && pq->result_status && pq->result_error_message && pq->result_error_field && pq->clear
        && pq->get_copy_data && pq->freemem && pq->get_result && pq->error_message && pq->status
        && pq->is_nonblocking;
}

#define COPY_DATABASE_ERROR 1

struct copy_failure {
    char sqlstate[6];
    char message[2048];
};

static void note_failure(struct copy_failure *failure, const char *sqlstate, const char *message) {
    if (failure->message[0]) return; /* the first error is the one to report */
    snprintf(failure->sqlstate, sizeof failure->sqlstate, "%s", sqlstate ? sqlstate : "");
    snprintf(failure->message, sizeof failure->message, "%s", message && message[0] ? message : "unknown error");
}

static void note_result(const struct libpq *pq, PGresult *result, struct copy_failure *failure) {
    int status = pq->result_status(result);
    if (status == PGRES_FATAL_ERROR || status == PGRES_BAD_RESPONSE)
        note_failure(failure, pq->result_error_field(result, PG_DIAG_SQLSTATE), pq->result_error_message(result));
}

static int usable(const char *library, PGconn *conn, struct libpq *pq) {
    return conn != NULL && load_libpq(library, pq) && pq->status(conn) == CONNECTION_OK && !pq->is_nonblocking(conn);
}

/* copy_applies(library, pgconn) -> bool: copy_blocks can run on this connection. */
static PyObject *copy_applies(PyObject *self, PyObject *args) {
    const char *library;
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "yK", &library, &address)) return NULL;
    struct libpq pq;
    return PyBool_FromLong(usable(library, (PGconn *)(uintptr_t)address, &pq));
}

/* copy_blocks(library, pgconn, sql, block_bytes, deliver) -> (status, sqlstate, message)
 * Runs ``sql`` (a COPY ... TO STDOUT) on ``pgconn`` and calls deliver(block, used) for each
 * bytearray of about ``block_bytes`` filled with whole rows (libpq returns one row per
 * PQgetCopyData; a longer row gets a block of its own). When deliver returns false or raises,
 * the rest of the output is read and dropped, so the connection is ready for its next
 * statement either way; deliver's exception is then raised. */
static PyObject *copy_blocks(PyObject *self, PyObject *args) {
    const char *library;
    unsigned long long address;
    Py_buffer sql;
    Py_ssize_t block_bytes;
    PyObject *deliver;
    if (!PyArg_ParseTuple(args, "yKy*nO", &library, &address, &sql, &block_bytes, &deliver)) return NULL;
    PGconn *conn = (PGconn *)(uintptr_t)address;
    struct libpq pq;
    struct copy_failure failure = {"", ""};
    if (block_bytes <= 0 || !usable(library, conn, &pq)) {
        PyBuffer_Release(&sql);
        PyErr_SetString(PyExc_ValueError, "copy_blocks: no usable libpq connection (check copy_applies first)");
        return NULL;
    }
    PyObject *error_type = NULL, *error_value = NULL, *error_traceback = NULL;
    PGresult *result;
    int copying = 0;
    Py_BEGIN_ALLOW_THREADS
    result = pq.exec(conn, (const char *)sql.buf);
    if (result == NULL) {
        note_failure(&failure, NULL, pq.error_message(conn));
    } else if (pq.result_status(result) == PGRES_COPY_OUT) {
        copying = 1;
    } else {
        note_result(&pq, result, &failure);
        note_failure(&failure, NULL, "the statement did not start a COPY TO STDOUT");
    }
    if (result != NULL) pq.clear(result);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&sql);
    int stopped = 0;
    char *pending = NULL; /* a row read that did not fit the block being filled */
    Py_ssize_t pending_length = 0;
    while (copying) {
        PyObject *block = NULL;
        char *data = NULL;
        Py_ssize_t size = 0, used = 0;
        if (!stopped) {
            size = pending_length > block_bytes ? pending_length : block_bytes;
            block = PyByteArray_FromStringAndSize(NULL, size);
            if (block == NULL) {
                PyErr_Fetch(&error_type, &error_value, &error_traceback);
                stopped = 1;
            } else {
                data = PyByteArray_AS_STRING(block);
            }
        }
        Py_BEGIN_ALLOW_THREADS
        for (;;) {
            if (pending != NULL) {
                if (!stopped && used + pending_length > size) break; /* block full: deliver it */
                if (!stopped) {
                    memcpy(data + used, pending, (size_t)pending_length);
                    used += pending_length;
                }
                pq.freemem(pending);
                pending = NULL;
            }
            int length = pq.get_copy_data(conn, &pending, 0);
            if (length < 0) { /* -1: the end of the data, the command's result follows; -2: failed */
                pending = NULL;
                if (length != -1) note_failure(&failure, NULL, pq.error_message(conn));
                copying = 0;
                break;
            }
            pending_length = length;
        }
        Py_END_ALLOW_THREADS
        if (block != NULL && used > 0) {
            PyObject *going_on = PyObject_CallFunction(deliver, "On", block, used);
            if (going_on == NULL) {
                PyErr_Fetch(&error_type, &error_value, &error_traceback);
                stopped = 1;
            } else {
                stopped = !PyObject_IsTrue(going_on);
                Py_DECREF(going_on);
            }
        }
        Py_XDECREF(block);
    }
    Py_BEGIN_ALLOW_THREADS
    while ((result = pq.get_result(conn)) != NULL) {
        note_result(&pq, result, &failure);
        pq.clear(result);
    }
    Py_END_ALLOW_THREADS
    if (error_type != NULL) {
        PyErr_Restore(error_type, error_value, error_traceback);
        return NULL;
    }
    return Py_BuildValue("(iyy)", failure.message[0] ? COPY_DATABASE_ERROR : 0, failure.sqlstate, failure.message);
}

static PyMethodDef methods[] = {
    {"split_rows", split_rows, METH_VARARGS, "Split newline-ended rows into Arrow offsets and data."},
    {"needs_work", needs_work, METH_VARARGS, "Index of the first value that may need normalisation, or -1."},
    {"hash64", hash64, METH_VARARGS, "64-bit hashes of Arrow string values."},
    {"object_values", object_values, METH_VARARGS, "Member values of plain jsonb objects, row by row."},
    {"plain_keys", plain_keys, METH_VARARGS, "Keys and hashes of a block of prefixed plain values, or -1."},
    {"copy_applies", copy_applies, METH_VARARGS, "Whether copy_blocks can run on this PGconn."},
    {"copy_blocks", copy_blocks, METH_VARARGS, "Run a COPY TO STDOUT on psycopg2's PGconn, handing over blocks of rows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    powers[0] = 1;
    for (int i = 1; i < POWERS; i++) powers[i] = powers[i - 1] * PRIME;
    return PyModule_Create(&module);
}
