/* The TCP floor: the least any transfer of an image's non-zero pages over
 * loopback TCP into a fresh file does, for the data-path benchmark.
 *
 * datapath.py builds it (cc -O2 -pthread) and runs it as two processes, like
 * dsamig and QEMU (contender "tcp-floor"):
 *
 *   tcp_floor recv DEST SIZE CHANNELS PACKET_BYTES
 *   tcp_floor send IMAGE PORT CHANNELS PACKET_BYTES
 *
 * Before its clock starts the sender finds the image's non-zero pages (it is
 * handed them, as the write floor is) and faults its mapping of them in. Per
 * packet of PACKET_BYTES it then writes one message in one sendmsg: a header,
 * the packet's runs of non-zero pages, and their bytes straight from the
 * mapping; packets go round-robin over the channels, a thread per channel on
 * each side. The receiver reads each payload into a per-channel buffer and
 * pwrites every run where it belongs (one packet at a time per file: see
 * write_lock), then fsyncs the file and answers one
 * byte. Nothing is checksummed, recorded or acknowledged before the end: what
 * is left is the two socket copies, TCP, and the write floor's pwrite.
 *
 * Each side prints one line of JSON: the sender {"time-s", "cpu-s"} from just
 * before it connects until the receiver's answer, the receiver {"cpu-s"} from
 * its first connection until it answered. Errors: a message on stderr, exit 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define END_RUNS 0xFFFFFFFFu
#define MAX_CHANNELS 64

struct header { uint64_t offset; uint32_t runs; uint32_t length; };
struct run { uint32_t start; uint32_t length; };

static void die(const char *what) {
    fprintf(stderr, "tcp_floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double cpu_s(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void recv_all(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, MSG_WAITALL);
        if (n == 0) { errno = EPIPE; die("recv: the sender closed the connection"); }
        if (n < 0) { if (errno == EINTR) continue; die("recv"); }
        p += n; len -= (size_t)n;
    }
}

static void send_all(int fd, struct iovec *iov, int count) {
    while (count) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)count };
        ssize_t n = sendmsg(fd, &msg, 0);
        if (n < 0) { if (errno == EINTR) continue; die("sendmsg"); }
        while (count && (size_t)n >= iov->iov_len) { n -= (ssize_t)iov->iov_len; iov++; count--; }
        if (count) { iov->iov_base = (char *)iov->iov_base + n; iov->iov_len -= (size_t)n; }
    }
}

/* -- receiver ------------------------------------------------------------------------ */

static int dest_fd;
static size_t packet_bytes;
/* Writes to one file take its inode lock anyway; waiting for it here, asleep,
 * costs less than the kernel's spinning on it (as dsamig's receiver does). */
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;

static void *recv_channel(void *arg) {
    int fd = (int)(intptr_t)arg;
    size_t max_runs = packet_bytes / PAGE;
    struct run *runs = malloc(max_runs * sizeof *runs);
    char *buf = malloc(packet_bytes);
    if (!runs || !buf) die("malloc");
    for (;;) {
        struct header h;
        recv_all(fd, &h, sizeof h);
        if (h.runs == END_RUNS) break;
        if (h.runs > max_runs || h.length > packet_bytes) { errno = EPROTO; die("bad header"); }
        recv_all(fd, runs, h.runs * sizeof *runs);
        recv_all(fd, buf, h.length);
        size_t at = 0;
        pthread_mutex_lock(&write_lock);
        for (uint32_t i = 0; i < h.runs; i++) {
            if (pwrite(dest_fd, buf + at, runs[i].length, (off_t)(h.offset + runs[i].start))
                    != (ssize_t)runs[i].length)
                die("pwrite");
            at += runs[i].length;
        }
        pthread_mutex_unlock(&write_lock);
    }
    free(runs);
    free(buf);
    return NULL;
}

static int receiver(const char *dest, off_t size, int channels) {
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t alen = sizeof a;
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, channels)
            || getsockname(ls, (struct sockaddr *)&a, &alen))
        die("listen");
    fprintf(stderr, "listening on 127.0.0.1:%d\n", ntohs(a.sin_port));
    fflush(stderr);
    dest_fd = open(dest, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (dest_fd < 0 || ftruncate(dest_fd, size)) die(dest);
    int fds[MAX_CHANNELS];
    double cpu0 = 0;
    pthread_t threads[MAX_CHANNELS];
    for (int i = 0; i < channels; i++) {
        fds[i] = accept(ls, NULL, NULL);
        if (fds[i] < 0) die("accept");
        if (i == 0) cpu0 = cpu_s();
        if (pthread_create(&threads[i], NULL, recv_channel, (void *)(intptr_t)fds[i]))
            die("pthread_create");
    }
    for (int i = 0; i < channels; i++) pthread_join(threads[i], NULL);
    if (fsync(dest_fd) || close(dest_fd)) die("fsync");
    if (send(fds[0], "!", 1, 0) != 1) die("send");
    double cpu = cpu_s() - cpu0;
    for (int i = 0; i < channels; i++) close(fds[i]);
    printf("{\"cpu-s\": %.6f}\n", cpu);
    return 0;
}

/* -- sender -------------------------------------------------------------------------- */

struct packet { uint64_t offset; uint32_t first_run; uint32_t runs; uint32_t length; };

static const char *image;
static struct packet *packets;
static struct run *all_runs;
static size_t packet_count;
static int channel_count;

struct send_arg { int fd; int index; };

static void *send_channel(void *arg) {
    struct send_arg *sa = arg;
    size_t max_runs = packet_bytes / PAGE;
    struct iovec *iov = malloc((2 + max_runs) * sizeof *iov);
    if (!iov) die("malloc");
    for (size_t p = (size_t)sa->index; p < packet_count; p += (size_t)channel_count) {
        struct packet *pk = &packets[p];
        struct header h = { pk->offset, pk->runs, pk->length };
        struct run *runs = &all_runs[pk->first_run];
        iov[0] = (struct iovec){ &h, sizeof h };
        iov[1] = (struct iovec){ runs, pk->runs * sizeof *runs };
        for (uint32_t i = 0; i < pk->runs; i++)
            iov[2 + i] = (struct iovec){ (char *)image + pk->offset + runs[i].start,
                                         runs[i].length };
        send_all(sa->fd, iov, 2 + (int)pk->runs);
    }
    struct header end = { 0, END_RUNS, 0 };
    struct iovec e = { &end, sizeof end };
    send_all(sa->fd, &e, 1);
    free(iov);
    return NULL;
}

static int is_zero(const char *page, size_t len) {
    static const char zeros[PAGE];
    return memcmp(page, zeros, len) == 0;
}

static int sender(const char *path, int port, int channels) {
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) die(path);
    size_t size = (size_t)st.st_size;
    image = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (image == MAP_FAILED) die("mmap");
    /* Untimed: find the runs of non-zero pages per packet, fault them in. */
    packet_count = (size + packet_bytes - 1) / packet_bytes;
    packets = calloc(packet_count, sizeof *packets);
    all_runs = malloc((size / PAGE + 1) * sizeof *all_runs);
    if (!packets || !all_runs) die("malloc");
    size_t kept = 0, nruns = 0;
    for (size_t p = 0; p < packet_count; p++) {
        size_t start = p * packet_bytes, stop = start + packet_bytes < size ? start + packet_bytes : size;
        struct packet pk = { start, (uint32_t)nruns, 0, 0 };
        for (size_t at = start; at < stop; at += PAGE) {
            size_t len = stop - at < PAGE ? stop - at : PAGE;
            if (is_zero(image + at, len)) continue;
            struct run *last = pk.runs ? &all_runs[nruns - 1] : NULL;
            if (last && pk.offset + last->start + last->length == at) {
                last->length += (uint32_t)len;
            } else {
                all_runs[nruns++] = (struct run){ (uint32_t)(at - start), (uint32_t)len };
                pk.runs++;
            }
            pk.length += (uint32_t)len;
        }
        if (pk.runs) packets[kept++] = pk;
    }
    packet_count = kept;
    for (size_t p = 0; p < packet_count; p++)
        madvise((void *)(image + packets[p].offset), packet_bytes < size - packets[p].offset
                ? packet_bytes : size - packets[p].offset, 22 /* MADV_POPULATE_READ */);

    double cpu0 = cpu_s(), t0 = now_s();
    int fds[MAX_CHANNELS];
    struct send_arg args[MAX_CHANNELS];
    pthread_t threads[MAX_CHANNELS];
    channel_count = channels;
    for (int i = 0; i < channels; i++) {
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&a, sizeof a)) die("connect");
    }
    for (int i = 0; i < channels; i++) {
        args[i] = (struct send_arg){ fds[i], i };
        if (pthread_create(&threads[i], NULL, send_channel, &args[i])) die("pthread_create");
    }
    for (int i = 0; i < channels; i++) pthread_join(threads[i], NULL);
    char answer = 0;
    if (recv(fds[0], &answer, 1, MSG_WAITALL) != 1 || answer != '!') die("the receiver's answer");
    double elapsed = now_s() - t0, cpu = cpu_s() - cpu0;
    for (int i = 0; i < channels; i++) close(fds[i]);
    printf("{\"time-s\": %.6f, \"cpu-s\": %.6f}\n", elapsed, cpu);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 6 && !strcmp(argv[1], "recv")) {
        int channels = atoi(argv[4]);
        packet_bytes = strtoull(argv[5], NULL, 10);
        if (channels < 1 || channels > MAX_CHANNELS || packet_bytes < PAGE) goto usage;
        return receiver(argv[2], (off_t)strtoll(argv[3], NULL, 10), channels);
    }
    if (argc == 6 && !strcmp(argv[1], "send")) {
        int channels = atoi(argv[4]);
        packet_bytes = strtoull(argv[5], NULL, 10);
        if (channels < 1 || channels > MAX_CHANNELS || packet_bytes < PAGE) goto usage;
        return sender(argv[2], atoi(argv[3]), channels);
    }
usage:
    fprintf(stderr, "usage: tcp_floor recv DEST SIZE CHANNELS PACKET_BYTES\n"
                    "       tcp_floor send IMAGE PORT CHANNELS PACKET_BYTES\n");
    return 2;
}
