/* The per-run half of a warm sandbox (sandbox/warm.py), in C.
 *
 * The Python zygote builds the template root once, pivots into it and then execs this
 * program (from a descriptor opened before the pivot) with its socket to the
 * supervisor. For each request it does what sandbox/child.py's _launch, stage2 (warm)
 * and stage3 do, in the same order and with the same report lines, but without three
 * forks of a Python process:
 *
 *   zygote loop: fork the next run's launcher, reap it, write "R" on the socket
 *                (init has been handed over to the supervisor), again
 *   launcher:    ahead of time: unshare a user namespace of the run's own (the zygote
 *                writes its maps: the zygote's ids onto themselves), then the run's
 *                other namespaces, and bring up loopback; then
 *                receive the run (descriptors + a spec) from the socket, join the
 *                run's cgroup, unshare the cgroup namespace, name the host, fork
 *                init, write "P <pid> <cpu s>", exit
 *   init:        mount the run's /dev/shm, /proc, /tmp and /box, write the files,
 *                fork the payload, forward signals, reap everything, write
 *                "S <status> <maxrss> <user> <sys>"; exit if the supervisor goes
 *   payload:     signals, session, stdio, rlimits, bounding set, ids, cwd,
 *                descriptors, capabilities, no_new_privs, seccomp last, execve
 *
 * The spec is made by warm.py (_native_spec): little-endian u32/u64 integers and
 * strings as a u32 length then the bytes. Every decision (mount options, PATH search
 * candidates, rlimits, the BPF program) is made in Python; this file only applies it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_FDS 16
/* Counts in a request are bounded by its size (every item takes at least 4 bytes);
 * this only keeps a corrupt count from asking for absurd allocations. */
#define MAX_ITEMS (1u << 24)

struct str { const char *p; uint32_t n; };

struct spec {
    int control, report, stdio[3], listener;
    int procs[MAX_FDS], nprocs;
    struct str hostname;
    uint32_t nmounts; struct str m_src[16], m_target[16], m_type[16], m_data[16];
    uint32_t m_flags[16];
    uint32_t owner_uid, owner_gid, nfiles;
    struct str *f_path, *f_data;
    uint32_t uid, gid, setgroups, ncand;
    struct str cwd;
    char **argv, **envp, **cand;
    uint32_t nrlim, rl_res[32]; uint64_t rl_soft[32], rl_hard[32];
    struct str bpf, bpf_plain; uint32_t notify, last_cap, nsig, sigs[32];
};

static struct spec S;
static pid_t payload_pid;

/* --- reporting ------------------------------------------------------------------ */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    if (write(S.report, line, n) < 0) _exit(1);
}

/* Report a failed step as child.py's _fail does ("E OSError ..."), and exit. */
static void fail(const char *what)
{
    int err = errno;
    say("E OSError [Errno %d] %s: %s", err, strerror(err), what);
    _exit(125);
}

static double seconds(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

static double cpu_seconds(void)
{
    struct rusage own;
    getrusage(RUSAGE_SELF, &own);
    return seconds(own.ru_utime) + seconds(own.ru_stime);
}

/* --- reading the spec ------------------------------------------------------------- */

struct reader { const char *p, *end; };

static uint32_t u32(struct reader *r)
{
    uint32_t v;
    if (r->end - r->p < 4) { errno = EPROTO; fail("a short launch request"); }
    memcpy(&v, r->p, 4); r->p += 4;
    return v;
}

static uint64_t u64(struct reader *r)
{
    uint64_t v;
    if (r->end - r->p < 8) { errno = EPROTO; fail("a short launch request"); }
    memcpy(&v, r->p, 8); r->p += 8;
    return v;
}

/* A string points into the request buffer; cstr copies one out with its NUL. */
static struct str string(struct reader *r)
{
    struct str s;
    s.n = u32(r);
    if ((uint32_t)(r->end - r->p) < s.n) { errno = EPROTO; fail("a short launch request"); }
    s.p = r->p; r->p += s.n;
    return s;
}

static char *cstr(struct str s)
{
    char *c = malloc((size_t)s.n + 1);
    if (!c) fail("malloc");
    memcpy(c, s.p, s.n); c[s.n] = 0;
    return c;
}

static uint32_t count(struct reader *r, uint32_t most)
{
    uint32_t n = u32(r);
    if (n > most || n > (uint32_t)(r->end - r->p)) {
        errno = EPROTO;
        fail("a launch request with a bad count");
    }
    return n;
}

static void *array(size_t n, size_t size)
{
    void *p = calloc(n + 1, size);
    if (!p) fail("calloc");
    return p;
}

static char **strings(struct reader *r)
{
    uint32_t n = count(r, MAX_ITEMS);
    char **list = array(n, sizeof(char *));
    for (uint32_t i = 0; i < n; i++) list[i] = cstr(string(r));
    return list;
}

static int fd_at(int index, const int *fds, int nfds)
{
    if (index < 0) return -1;
    if (index >= nfds) { errno = EBADF; fail("a descriptor index out of range"); }
    return fds[index];
}

static void parse(const char *buf, size_t len, const int *fds, int nfds)
{
    struct reader r = { buf, buf + len };
    int32_t layout[6];
    for (int i = 0; i < 6; i++) layout[i] = (int32_t)u32(&r);
    S.control = fd_at(layout[0], fds, nfds);
    S.report = fd_at(layout[1], fds, nfds);
    for (int i = 0; i < 3; i++) S.stdio[i] = fd_at(layout[2 + i], fds, nfds);
    S.listener = fd_at(layout[5], fds, nfds);
    S.nprocs = count(&r, MAX_FDS);
    for (int i = 0; i < S.nprocs; i++) S.procs[i] = fd_at((int32_t)u32(&r), fds, nfds);
    S.hostname = string(&r);
    S.nmounts = count(&r, 16);
    for (uint32_t i = 0; i < S.nmounts; i++) {
        S.m_src[i] = string(&r); S.m_target[i] = string(&r); S.m_type[i] = string(&r);
        S.m_flags[i] = u32(&r); S.m_data[i] = string(&r);
    }
    S.owner_uid = u32(&r); S.owner_gid = u32(&r);
    S.nfiles = count(&r, MAX_ITEMS);
    S.f_path = array(S.nfiles, sizeof(struct str));
    S.f_data = array(S.nfiles, sizeof(struct str));
    for (uint32_t i = 0; i < S.nfiles; i++) { S.f_path[i] = string(&r); S.f_data[i] = string(&r); }
    S.uid = u32(&r); S.gid = u32(&r); S.setgroups = u32(&r);
    S.cwd = string(&r);
    S.argv = strings(&r);
    S.envp = strings(&r);
    S.cand = strings(&r);
    for (S.ncand = 0; S.cand[S.ncand]; S.ncand++) {}
    S.nrlim = count(&r, 32);
    for (uint32_t i = 0; i < S.nrlim; i++) {
        S.rl_res[i] = u32(&r); S.rl_soft[i] = u64(&r); S.rl_hard[i] = u64(&r);
    }
    S.bpf = string(&r); S.bpf_plain = string(&r); S.notify = u32(&r); S.last_cap = u32(&r);
    S.nsig = count(&r, 32);
    for (uint32_t i = 0; i < S.nsig; i++) S.sigs[i] = u32(&r);
}

/* --- the payload ------------------------------------------------------------------ */

static void send_fd(int sock, int fd)
{
    char byte = 'L';
    struct iovec iov = { &byte, 1 };
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } c;
    struct msghdr msg = { 0 };
    msg.msg_iov = &iov; msg.msg_iovlen = 1;
    msg.msg_control = c.buf; msg.msg_controllen = sizeof c.buf;
    struct cmsghdr *h = CMSG_FIRSTHDR(&msg);
    h->cmsg_level = SOL_SOCKET; h->cmsg_type = SCM_RIGHTS; h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &fd, sizeof(int));
    if (sendmsg(sock, &msg, 0) < 0) fail("sending the seccomp listener");
}

static long load_filter(struct str program, unsigned flags)
{
    if (program.n / sizeof(struct sock_filter) > BPF_MAXINSNS) {
        errno = E2BIG;
        return -1;
    }
    struct sock_fprog prog = { (unsigned short)(program.n / sizeof(struct sock_filter)),
                               (struct sock_filter *)cstr(program) };
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

static void install_seccomp(void)
{
    if (S.bpf.n == 0) return;
    long fd = load_filter(S.bpf, S.notify ? SECCOMP_FILTER_FLAG_NEW_LISTENER : 0);
    if (fd < 0 && S.notify && (errno == EBUSY || errno == EINVAL)) {
        /* A filter stacked before this one has a listener (sbx nested in a sandbox
         * that uses one), or the kernel lacks the flag: kill actions kill instead. */
        fd = load_filter(S.bpf_plain, 0);
        if (fd >= 0) fd = -2;
    }
    if (fd == -1) fail("seccomp(SECCOMP_SET_MODE_FILTER)");
    if (S.notify && fd >= 0 && S.listener >= 0) { send_fd(S.listener, (int)fd); close((int)fd); }
}

struct cap_header { uint32_t version; int pid; };
struct cap_data { uint32_t effective, permitted, inheritable; };

static void payload(void)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP) signal(sig, SIG_DFL);
    if (setsid() < 0) fail("setsid");
    /* Under memory pressure the kernel's OOM killer picks the payload, not init. */
    int oom = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (oom < 0 || write(oom, "1000", 4) != 4) fail("/proc/self/oom_score_adj");
    close(oom);
    for (int i = 0; i < 3; i++)
        if (S.stdio[i] >= 0 && S.stdio[i] != i) {
            if (dup2(S.stdio[i], i) < 0) fail("dup2");
            close(S.stdio[i]);
        }
    for (uint32_t i = 0; i < S.nrlim; i++) {
        struct rlimit rl = { S.rl_soft[i], S.rl_hard[i] };
        if (setrlimit(S.rl_res[i], &rl) < 0) fail("setrlimit");
    }
    struct rlimit core = { 0, 0 };
    if (setrlimit(RLIMIT_CORE, &core) < 0) fail("setrlimit(RLIMIT_CORE)");
    for (uint32_t cap = 0; cap <= S.last_cap; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) fail("prctl(PR_CAPBSET_DROP)");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0) fail("prctl(PR_CAP_AMBIENT)");
    if (S.setgroups && setgroups(0, NULL) < 0) fail("setgroups");
    if (setresgid(S.gid, S.gid, S.gid) < 0) fail("setresgid");
    if (setresuid(S.uid, S.uid, S.uid) < 0) fail("setresuid");
    /* A session keyring of the run's own, not the caller's (keyrings are checked by
     * host uid, so the payload would hold the caller's rights on it). */
    if (syscall(SYS_keyctl, 1 /* KEYCTL_JOIN_SESSION_KEYRING */, NULL) < 0 && errno != ENOSYS)
        fail("keyctl(KEYCTL_JOIN_SESSION_KEYRING)");
    char *cwd = cstr(S.cwd);
    if (chdir(cwd) < 0) fail(cwd);
    /* Keep 0-2, the report pipe and the listener socket: close the rest. */
    int keep[2] = { S.report, S.listener };
    if (keep[0] > keep[1]) { int t = keep[0]; keep[0] = keep[1]; keep[1] = t; }
    unsigned low = 3;
    for (int k = 0; k < 2; k++) {
        if (keep[k] < (int)low) continue;
        if ((unsigned)keep[k] > low) syscall(SYS_close_range, low, keep[k] - 1, 0);
        low = keep[k] + 1;
    }
    syscall(SYS_close_range, low, ~0U, 0);
    struct cap_header header = { 0x20080522, 0 };
    struct cap_data data[2] = { { 0 } };
    if (syscall(SYS_capset, &header, data) < 0) fail("capset");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) fail("prctl(PR_SET_NO_NEW_PRIVS)");
    install_seccomp();
    /* execvp's order: the most telling error wins, EACCES over ENOENT. */
    int error = ENOENT;
    for (uint32_t i = 0; i < S.ncand; i++) {
        execve(S.cand[i], S.argv, S.envp);
        if (errno != ENOENT || error == ENOENT) error = errno;
    }
    say("X %d", error);
    _exit(127);
}

/* --- init ------------------------------------------------------------------------- */

static void forward(int sig)
{
    if (payload_pid > 0) kill(payload_pid, sig);
}

static void mkdirs_owned(char *path)
{
    /* path is /box/...: create each missing parent below /box, owned by the payload. */
    for (char *p = path + 5; (p = strchr(p, '/')); p++) {
        *p = 0;
        if (mkdir(path, 0755) == 0) {
            if (chown(path, S.owner_uid, S.owner_gid) < 0) fail(path);
        } else if (errno != EEXIST) {
            fail(path);
        }
        *p = '/';
    }
}

static void place_files(void)
{
    for (uint32_t i = 0; i < S.nfiles; i++) {
        char *path = cstr(S.f_path[i]);
        mkdirs_owned(path);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd < 0 && errno == ENOSPC) {
            say("E the files for /box do not fit in its tmpfs (%u files): raise "
                "tmpfs_size (--tmpfs-size)", S.nfiles);
            _exit(125);
        }
        if (fd < 0) fail(path);
        const char *p = S.f_data[i].p;
        size_t left = S.f_data[i].n;
        while (left) {
            ssize_t n = write(fd, p, left);
            if (n < 0) {
                if (errno == ENOSPC) {
                    say("E the files for /box do not fit in its tmpfs (%u files): raise "
                        "tmpfs_size (--tmpfs-size)", S.nfiles);
                    _exit(125);
                }
                fail(path);
            }
            p += n; left -= (size_t)n;
        }
        if (fchown(fd, S.owner_uid, S.owner_gid) < 0) fail(path);
        close(fd);
        free(path);
    }
}

static void init(void)
{
    /* No death signal: this process's parent is the launcher, which exits at once,
     * then the supervisor, which adopts it. The supervisor holds the only write end
     * of the control pipe and never writes to it: a hang-up there means it is gone,
     * and init then exits, which kills the run. */
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP && sig != SIGCHLD) signal(sig, SIG_IGN);
    for (uint32_t i = 0; i < S.nmounts; i++) {
        char *src = cstr(S.m_src[i]), *target = cstr(S.m_target[i]);
        char *type = cstr(S.m_type[i]), *data = cstr(S.m_data[i]);
        if (mount(src, target, type, S.m_flags[i], *data ? data : NULL) < 0) {
            int err = errno;
            say("E cannot set up %s (%s): [Errno %d] %s", target, type, err,
                strerror(err));
            _exit(125);
        }
    }
    place_files();
    say("F tmpfs");
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int children = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (children < 0) fail("signalfd");
    payload_pid = fork();
    if (payload_pid < 0) fail("fork");
    if (payload_pid == 0) payload();
    struct sigaction sa = { 0 };
    sa.sa_handler = forward;
    for (uint32_t i = 0; i < S.nsig; i++) sigaction(S.sigs[i], &sa, NULL);
    for (int i = 0; i < 3; i++) if (S.stdio[i] >= 0) close(S.stdio[i]);
    if (S.listener >= 0) close(S.listener);
    long max_rss = 0;
    for (;;) {
        int status;
        struct rusage ru;
        pid_t pid;
        while ((pid = wait4(-1, &status, WNOHANG, &ru)) > 0) {
            if (ru.ru_maxrss > max_rss) max_rss = ru.ru_maxrss;
            if (pid == payload_pid) {
                struct rusage own;
                getrusage(RUSAGE_SELF, &own);
                say("S %d %ld %.6f %.6f", status, max_rss, seconds(own.ru_utime),
                    seconds(own.ru_stime));
                _exit(0);
            }
        }
        struct pollfd watch[2] = { { S.control, POLLIN, 0 }, { children, POLLIN, 0 } };
        if (poll(watch, 2, -1) < 0) {
            if (errno == EINTR) continue;
            fail("poll");
        }
        if (watch[0].revents) _exit(1); /* the supervisor is gone */
        struct signalfd_siginfo info;
        while (read(children, &info, sizeof info) > 0) {}
    }
}

/* --- the launcher ----------------------------------------------------------------- */

static int loopback_up(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr = { 0 };
    strcpy(ifr.ifr_name, "lo");
    if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0) return -1;
    ifr.ifr_flags |= IFF_UP;
    int rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    close(s);
    return rc;
}

/* A launcher is forked ahead of its run: it makes the run's namespaces while the
 * previous run is still going, then waits for the request on the supervisor's socket
 * (it is the only reader: the next launcher is forked once this one has exited). */
static int receive_exactly(int sock, char *buf, size_t n)
{
    while (n) {
        ssize_t got = recv(sock, buf, n, 0);
        if (got <= 0) return -1;
        buf += got; n -= (size_t)got;
    }
    return 0;
}

#define EXIT_CLOSED 3

static void receive_request(int sock)
{
    char header[8];
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)]; } c;
    struct iovec iov = { header, sizeof header };
    struct msghdr msg = { 0 };
    msg.msg_iov = &iov; msg.msg_iovlen = 1;
    msg.msg_control = c.buf; msg.msg_controllen = sizeof c.buf;
    ssize_t got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (got == 0) _exit(EXIT_CLOSED);
    if (got < 0 || (msg.msg_flags & MSG_CTRUNC)) _exit(1);
    int fds[MAX_FDS], nfds = 0;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&msg); h; h = CMSG_NXTHDR(&msg, h))
        if (h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
            nfds = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds, CMSG_DATA(h), nfds * sizeof(int));
        }
    if (got < 8 && receive_exactly(sock, header + got, 8 - (size_t)got) < 0) _exit(1);
    uint64_t len;
    memcpy(&len, header, 8);
    char *body = malloc(len ? len : 1);
    if (!body || receive_exactly(sock, body, len) < 0) _exit(1);
    parse(body, len, fds, nfds);
}

/* Each run gets a user namespace of its own, nested in the zygote's and mapping the
 * same ids to themselves, so that nothing that lives in a user namespace (keyrings,
 * the per-user task count) is shared between runs. The zygote writes its maps. */
static int proc_fd = -1; /* the host's /proc, opened by the Python zygote before its pivot */
static char uid_map[512], gid_map[512];

static void identity_map(const char *name, char *out, size_t size)
{
    char path[64], text[512];
    snprintf(path, sizeof path, "%d/%s", getpid(), name);
    int fd = openat(proc_fd, path, O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, text, sizeof text - 1);
    if (fd >= 0) close(fd);
    out[0] = 0;
    if (n <= 0) return;
    text[n] = 0;
    size_t used = 0;
    unsigned long inside, outside, count;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
        if (sscanf(line, "%lu %lu %lu", &inside, &outside, &count) == 3)
            used += snprintf(out + used, size - used, "%lu %lu %lu\n", inside, inside, count);
}

static int write_maps(pid_t pid)
{
    const char *names[2] = { "uid_map", "gid_map" };
    const char *maps[2] = { uid_map, gid_map };
    for (int i = 0; i < 2; i++) {
        char path[64];
        snprintf(path, sizeof path, "%d/%s", pid, names[i]);
        int fd = openat(proc_fd, path, O_WRONLY | O_CLOEXEC);
        if (fd < 0) return -1;
        ssize_t n = write(fd, maps[i], strlen(maps[i]));
        close(fd);
        if (n != (ssize_t)strlen(maps[i])) return -1;
    }
    return 0;
}

static void launcher(int sock, int to_zygote, int from_zygote)
{
    /* "sbx-standby" until a request comes: the only name the supervisor reaps when a
     * zygote dies under a launcher still waiting (warm.py, _reap_orphaned_standbys). */
    prctl(PR_SET_NAME, "sbx-standby", 0, 0, 0);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) _exit(1);
    close(proc_fd);
    /* Ahead of the request: every namespace but the cgroup one, which must come after
     * joining the run's cgroup. A failure is reported once there is a run to fail. */
    int early_errno = 0;
    const char *early_step = NULL;
    char said = 'U', answer = 0;
    if (unshare(CLONE_NEWUSER) < 0) {
        early_errno = errno; early_step = "unshare(CLONE_NEWUSER)"; said = 'F';
    }
    if (write(to_zygote, &said, 1) != 1 || read(from_zygote, &answer, 1) != 1) _exit(1);
    close(to_zygote);
    close(from_zygote);
    if (!early_step && answer != 'M') {
        early_errno = EPERM; early_step = "writing the run's id maps";
    }
    if (early_step) {
        /* reported below, with the request */
    } else if (unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
                       | CLONE_NEWUTS) < 0) {
        early_errno = errno; early_step = "unshare";
    } else if (loopback_up() < 0) {
        early_errno = errno; early_step = "bringing up loopback";
    }
    receive_request(sock);
    prctl(PR_SET_NAME, "sbx-launcher", 0, 0, 0);
    close(sock);
    if (early_step) { errno = early_errno; fail(early_step); }
    for (int i = 0; i < S.nprocs; i++) {
        if (write(S.procs[i], "0", 1) != 1) fail("joining the run's cgroup");
        close(S.procs[i]);
    }
    /* Only what this process uses from now on is charged to the run's cgroup. */
    double joined_cpu = cpu_seconds();
    if (unshare(CLONE_NEWCGROUP) < 0) fail("unshare(CLONE_NEWCGROUP)");
    char *name = cstr(S.hostname);
    if (sethostname(name, strlen(name)) < 0) fail("sethostname");
    /* init starts once this process has said P and exited (the pipe's write end
     * closes): the supervisor reads P before anything init says. */
    int order[2];
    if (pipe2(order, O_CLOEXEC) < 0) fail("pipe2");
    pid_t pid = fork();
    if (pid < 0) fail("fork");
    if (pid == 0) {
        char byte;
        prctl(PR_SET_NAME, "sbx-init", 0, 0, 0);
        close(order[1]);
        while (read(order[0], &byte, 1) < 0 && errno == EINTR) {}
        close(order[0]);
        init();
    }
    say("P %d %.6f", pid, cpu_seconds() - joined_cpu);
    _exit(0);
}

/* --- the zygote loop -------------------------------------------------------------- */

int main(int argc, char **argv)
{
    if (argc != 3) return 2;
    int sock = atoi(argv[1]);
    proc_fd = atoi(argv[2]);
    fcntl(proc_fd, F_SETFD, FD_CLOEXEC);
    prctl(PR_SET_NAME, "sbx-zygote", 0, 0, 0);
    identity_map("uid_map", uid_map, sizeof uid_map);
    identity_map("gid_map", gid_map, sizeof gid_map);
    for (;;) {
        int up[2], down[2];
        if (pipe2(up, O_CLOEXEC) < 0 || pipe2(down, O_CLOEXEC) < 0) return 1;
        pid_t pid = fork();
        if (pid < 0) return 1;
        if (pid == 0) {
            close(up[0]);
            close(down[1]);
            launcher(sock, up[1], down[0]);
        }
        close(up[1]);
        close(down[0]);
        char said = 0, answer = 'F';
        if (read(up[0], &said, 1) == 1 && said == 'U' && write_maps(pid) == 0) answer = 'M';
        if (write(down[1], &answer, 1) < 0) { /* the launcher died; waitpid tells */ }
        close(up[0]);
        close(down[1]);
        int status;
        while (waitpid(pid, &status, 0) < 0)
            if (errno != EINTR) return 1;
        if (WIFEXITED(status) && WEXITSTATUS(status) == EXIT_CLOSED) return 0;
        /* The run's init is now the supervisor's (a child subreaper): say so. */
        if (write(sock, "R\n", 2) != 2) return 1;
    }
}
