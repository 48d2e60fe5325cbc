/* The compiled half of container_spawn: a vfork-style child that runs a list of set-up steps
 * (entering the container, joining its groups and keyring, confinement, the caller's file
 * actions) and execs, the way posix_spawn does it: CLONE_VM | CLONE_VFORK, so no page of the
 * caller is copied and no Python runs in the child.
 *
 * The steps are data, built and ordered by syscalls/spawnsteps.py (where each step's place is
 * explained); this file only knows how to run one. The child touches nothing but the step
 * list and its own stack, calls the kernel directly for anything glibc would coordinate
 * across threads (set*id), and reports a failure as (step index, errno) on a close-on-exec
 * pipe before _exit(127). The parent thread is suspended until the child has exec'd or died;
 * the caller's other threads run on.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

enum {
    CFS_SETNS = 1, CFS_FCHDIR, CFS_CHROOT, CFS_CHDIR, CFS_WRITE, CFS_SETFSUID, CFS_KEYJOIN,
    CFS_TRAP, CFS_SENDFD, CFS_UMASK, CFS_PRCTL, CFS_CAPSET, CFS_SECCOMP, CFS_DUP2,
    CFS_CLOEXEC_FROM, CFS_KEEP, CFS_CLOSE, CFS_SETSID, CFS_IOCTL, CFS_SETGROUPS, CFS_SETGID,
    CFS_SETUID, CFS_EXEC, CFS_SIGDFL, CFS_SIGMASK, CFS_FSOPEN, CFS_FSCONFIG, CFS_FSMOUNT,
    CFS_PROC_PLACE,
};

struct cfs_step {
    int op;
    int ignore;       /* an errno that is not a failure of this step (-1: none is) */
    long a, b;
    const char *data;
    long len;
};

struct cfs_ctx {
    const struct cfs_step *steps;
    int n;
    char *const *argv;
    char *const *envp;
    int errfd;
    sigset_t oldmask;  /* the caller's mask, restored just before exec */
};

static void fail(const struct cfs_ctx *c, int index, int err)
{
    int32_t msg[2] = { index, err };
    ssize_t r = write(c->errfd, msg, sizeof msg);
    (void)r;
    _exit(127);
}

#define CFS_MAX_MINE 64
struct cfs_state {
    int last_fd;   /* the listener made by the last TRAP, until SENDFD sends it */
    int saved_err; /* the first exec error other than "not there" */
    int last_err;  /* the last exec error */
    int fs, mnt;   /* the proc being made (FSOPEN, FSMOUNT), until PROC_PLACE puts it */
    int nmine;     /* procs put in place so far, by mount id */
    uint64_t mine[CFS_MAX_MINE];
};

#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x1000
#endif
#ifndef STATX_MNT_ID_UNIQUE
#define STATX_MNT_ID_UNIQUE 0x4000
#endif

/* The id of the mount fd is on (the never-reused one where the kernel has it), or 0. */
static uint64_t mount_id(int fd)
{
    static const unsigned masks[2] = { STATX_MNT_ID_UNIQUE, STATX_MNT_ID };
    for (int i = 0; i < 2; i++) {
        struct statx stx;
        if (statx(fd, "", AT_EMPTY_PATH, masks[i], &stx) < 0)
            return 0;
        if (stx.stx_mask & masks[i])
            return stx.stx_mnt_id;
    }
    return 0;
}

/* An O_PATH fd of path resolved in our root, never outside it (childsetup.open_in_root). */
static int open_in_root(const char *path)
{
    struct { uint64_t flags, mode, resolve; } how = {
        O_PATH | O_CLOEXEC, 0, 0x10 /* RESOLVE_IN_ROOT */ | 0x02 /* RESOLVE_NO_MAGICLINKS */ };
    int root = open("/", O_PATH | O_CLOEXEC);
    if (root < 0)
        return -1;
    int fd = syscall(SYS_openat2, root, path, &how, sizeof how);
    int err = errno;
    close(root);
    errno = err;
    return fd;
}

static int in_list(uint64_t id, const void *ids, long n)
{
    for (long i = 0; i < n; i++) {
        uint64_t x;
        memcpy(&x, (const char *)ids + i * sizeof x, sizeof x);  /* ids may be unaligned */
        if (x == id)
            return 1;
    }
    return 0;
}

/* Put the proc made by FSMOUNT at data's path (inside our root) in the place of the
 * placeholders (mount ids after the path's NUL, from offset b) that a creator mounted there
 * before this init existed: those on top are taken away first (nothing else runs in the
 * container yet), so the proc is the only mount there; one moved or covered since is left
 * alone, and the proc goes on top of what is there. Two entries naming one place give it one
 * proc. As childsetup.complete_proc. */
static int proc_place(const struct cfs_step *s, struct cfs_state *st)
{
    const char *ids = s->data + s->b;
    long nids = (s->len - s->b) / (long)sizeof(uint64_t);
    int mnt = st->mnt, rc = -1, target = open_in_root(s->data);
    st->mnt = -1;
    uint64_t top;
    while (target >= 0 && (top = mount_id(target)) != 0 && in_list(top, ids, nids)) {
        if (fchdir(target) < 0 || umount2(".", MNT_DETACH) < 0 || chdir("/") < 0)
            goto out;
        close(target);
        target = open_in_root(s->data);
    }
    if (target < 0)
        goto out;
    if (in_list(top, st->mine, st->nmine)) {
        rc = 0;
        goto out;
    }
    if (syscall(SYS_move_mount, mnt, "", target, "", 0x04 | 0x40 /* F_, T_EMPTY_PATH */) < 0)
        goto out;
    if (st->nmine < CFS_MAX_MINE)
        st->mine[st->nmine++] = mount_id(mnt);
    rc = 0;
out:;
    int err = errno;
    if (target >= 0)
        close(target);
    close(mnt);
    errno = err;
    return rc;
}

static int run_step(const struct cfs_ctx *c, const struct cfs_step *s, struct cfs_state *st)
{
    switch (s->op) {
    case CFS_SETNS:
        return syscall(SYS_setns, (int)s->a, (int)s->b);
    case CFS_FCHDIR:
        return fchdir((int)s->a);
    case CFS_CHROOT:
        return syscall(SYS_chroot, s->data);
    case CFS_CHDIR:
        return chdir(s->data);
    case CFS_WRITE:
        return write((int)s->a, s->data, s->len) == s->len ? 0 : -1;
    case CFS_SETFSUID:
        syscall(SYS_setfsuid, (uid_t)s->a);  /* returns the old fsuid, never an error */
        return 0;
    case CFS_KEYJOIN: {
        /* KEYCTL_JOIN_SESSION_KEYRING; a keyring of that name reached from another user
         * namespace is a new one: link the container's into it (as the Python path does). */
        long got = syscall(SYS_keyctl, 1, s->data);
        if (got < 0)
            return -1;
        if (got != s->a)
            syscall(SYS_keyctl, 8, (long)s->a, got);  /* KEYCTL_LINK, best effort */
        return 0;
    }
    case CFS_TRAP:
    case CFS_SECCOMP: {
        struct sock_fprog prog = { (unsigned short)(s->len / sizeof(struct sock_filter)),
                                   (struct sock_filter *)s->data };
        long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, (unsigned)s->a, &prog);
        if (fd < 0 && errno == EACCES && s->op == CFS_TRAP) {
            /* no CAP_SYS_ADMIN here: the kernel wants no_new_privs first */
            if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
                return -1;
            fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, (unsigned)s->a, &prog);
        }
        if (fd < 0)
            return -1;
        if (s->op == CFS_TRAP)
            st->last_fd = (int)fd;
        return 0;
    }
    case CFS_SENDFD: {
        /* The listener made by the last TRAP, to the service, as one datagram. */
        if (st->last_fd < 0)
            return 0;
        struct iovec iov = { (void *)s->data, (size_t)s->len };
        union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
        memset(&u, 0, sizeof u);
        struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1,
                            .msg_control = u.buf, .msg_controllen = sizeof u.buf };
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(h), &st->last_fd, sizeof(int));
        ssize_t r = sendmsg((int)s->a, &m, MSG_NOSIGNAL);
        close(st->last_fd);
        st->last_fd = -1;
        return r < 0 ? -1 : 0;
    }
    case CFS_UMASK:
        umask((mode_t)s->a);
        return 0;
    case CFS_PRCTL:
        return prctl((int)s->a, (unsigned long)s->b, 0, 0, 0);
    case CFS_CAPSET: {
        struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
        return syscall(SYS_capset, &hdr, (const struct __user_cap_data_struct *)s->data);
    }
    case CFS_DUP2:
        if (s->a == s->b) {
            int fl = fcntl((int)s->a, F_GETFD);
            return fl < 0 ? -1 : fcntl((int)s->a, F_SETFD, fl & ~FD_CLOEXEC);
        }
        return dup2((int)s->a, (int)s->b) < 0 ? -1 : 0;
    case CFS_CLOEXEC_FROM:
        return syscall(SYS_close_range, (unsigned)s->a, ~0U, CLOSE_RANGE_CLOEXEC);
    case CFS_KEEP: {
        int fl = fcntl((int)s->a, F_GETFD);
        return fl < 0 ? -1 : fcntl((int)s->a, F_SETFD, fl & ~FD_CLOEXEC);
    }
    case CFS_CLOSE:
        return close((int)s->a);
    case CFS_SETSID:
        return setsid() < 0 ? -1 : 0;
    case CFS_IOCTL:
        return ioctl((int)s->a, (unsigned long)s->b, 0);
    case CFS_SETGROUPS:
        return syscall(SYS_setgroups, s->len / sizeof(gid_t), (const gid_t *)s->data);
    case CFS_SETGID:
        return syscall(SYS_setresgid, (gid_t)s->a, (gid_t)s->a, (gid_t)s->a);
    case CFS_SETUID:
        return syscall(SYS_setresuid, (uid_t)s->a, (uid_t)s->a, (uid_t)s->a);
    case CFS_SIGDFL: {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        return sigaction((int)s->a, &sa, NULL);
    }
    case CFS_SIGMASK: {
        /* the signals of bit mask a (bit n-1: signal n) */
        sigset_t set;
        sigemptyset(&set);
        for (int sig = 1; sig <= 64 && sig < _NSIG; sig++)
            if ((unsigned long)s->a >> (sig - 1) & 1)
                sigaddset(&set, sig);
        return sigprocmask(SIG_SETMASK, &set, NULL);
    }
    case CFS_FSOPEN:
        st->fs = syscall(SYS_fsopen, s->data, 1 /* FSOPEN_CLOEXEC */);
        return st->fs < 0 ? -1 : 0;
    case CFS_FSCONFIG:
        /* data: the key, NUL, and with b the value, NUL */
        return syscall(SYS_fsconfig, st->fs, (unsigned)s->a, s->data,
                       s->b ? s->data + strlen(s->data) + 1 : NULL, 0);
    case CFS_FSMOUNT: {
        if (syscall(SYS_fsconfig, st->fs, 6 /* FSCONFIG_CMD_CREATE */, NULL, NULL, 0) < 0)
            return -1;
        st->mnt = syscall(SYS_fsmount, st->fs, 1 /* FSMOUNT_CLOEXEC */, (unsigned)s->a);
        int err = errno;
        close(st->fs);
        st->fs = -1;
        errno = err;
        return st->mnt < 0 ? -1 : 0;
    }
    case CFS_PROC_PLACE:
        return proc_place(s, st);
    case CFS_EXEC:
        /* One candidate of a PATH search: as execvpe, the first error other than "not
         * there" wins; the last step's error otherwise. */
        execve(s->data, c->argv, c->envp);
        st->last_err = errno;
        if (errno != ENOENT && errno != ENOTDIR && st->saved_err == 0)
            st->saved_err = errno;
        return 0;
    }
    errno = EINVAL;
    return -1;
}

/* The report fd moved above every fd a step dup2s onto or closes: the caller's file actions
 * may name any number, errfd's included (it cannot know it). */
static int move_errfd(const struct cfs_ctx *c)
{
    int errfd = c->errfd, top = -1, hit = 0;
    for (int i = 0; i < c->n; i++) {
        const struct cfs_step *s = &c->steps[i];
        long fd = s->op == CFS_DUP2 ? s->b : s->op == CFS_CLOSE ? s->a : -1;
        if (fd > top)
            top = (int)fd;
        hit |= fd == errfd;
    }
    return hit ? fcntl(errfd, F_DUPFD_CLOEXEC, top + 1) : errfd;
}

static int child(void *arg)
{
    struct cfs_ctx own = *(const struct cfs_ctx *)arg;
    const struct cfs_ctx *c = &own;
    own.errfd = move_errfd(c);
    if (own.errfd < 0)
        _exit(127);  /* (no fd left: nothing can be reported; the caller sees a dead pid) */
    /* No handler of the caller may run here (they would touch its memory): every caught
     * signal back to its default while all are still blocked. */
    for (int sig = 1; sig < _NSIG; sig++) {
        struct sigaction old;
        if (sigaction(sig, NULL, &old) == 0 && old.sa_handler != SIG_IGN &&
            old.sa_handler != SIG_DFL) {
            struct sigaction dfl;
            memset(&dfl, 0, sizeof dfl);
            dfl.sa_handler = SIG_DFL;
            sigaction(sig, &dfl, NULL);
        }
    }
    struct cfs_state st = { -1, 0, 0, -1, -1, 0, { 0 } };
    int exec_index = -1;
    for (int i = 0; i < c->n; i++) {
        const struct cfs_step *s = &c->steps[i];
        if (s->op == CFS_EXEC)
            exec_index = i;
        if (run_step(c, s, &st) < 0 && errno != s->ignore)
            fail(c, i, errno);
    }
    fail(c, exec_index, st.saved_err ? st.saved_err : st.last_err ? st.last_err : ENOEXEC);
    return 127;
}

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

#if defined(__x86_64__)
/* clone3(2) with a function to run on the new stack, as glibc's own __clone3 (not
 * exported by glibc 2.36): the child must not return through the caller's frames, which
 * it shares (CLONE_VM). Returns the pid or -errno in the parent; the child runs fn(arg)
 * and exits with its value. (rdi args, rsi size, rdx fn, rcx arg; syscall keeps rdx.) */
long cfs_clone3_raw(void *args, size_t size, int (*fn)(void *), void *arg);
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".type cfs_clone3_raw, @function\n"
    "cfs_clone3_raw:\n"
    "    mov %rcx, %r8\n"
    "    mov $435, %eax\n"      /* __NR_clone3 */
    "    syscall\n"
    "    test %rax, %rax\n"
    "    jz 1f\n"
    "    ret\n"
    "1:  xor %ebp, %ebp\n"     /* the child: the outermost frame */
    "    and $-16, %rsp\n"
    "    mov %r8, %rdi\n"
    "    call *%rdx\n"
    "    mov %rax, %rdi\n"
    "    mov $60, %eax\n"       /* __NR_exit */
    "    syscall\n"
    "    hlt\n"
    ".size cfs_clone3_raw, .-cfs_clone3_raw\n");
#define CFS_HAVE_CLONE3 1
#else
#define CFS_HAVE_CLONE3 0
#endif

struct cfs_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};

/* Whether cfs_spawn can place the child in a cgroup2 group as it is made. */
int cfs_into_cgroup(void)
{
    return CFS_HAVE_CLONE3;
}

/* Make the child: its pid (and *pidfd) in the caller, or -errno. Steps run in the child; a
 * failure is reported on errfd. `flags` adds clone flags (CLONE_PARENT). `cgroup`, an fd of
 * a cgroup2 group (or -1): the child is born in it (clone3's CLONE_INTO_CGROUP): it never
 * runs outside it, and no migration is needed (a cgroup.procs write takes the global
 * cgroup_threadgroup_rwsem for writing: 25-50 us on a quiet host, 5-18 ms for one in five
 * while other cgroup work ran beside it). */
long cfs_spawn(const struct cfs_step *steps, int n, char *const argv[], char *const envp[],
               int errfd, long flags, int *pidfd, int cgroup)
{
    struct cfs_ctx c = { steps, n, argv, envp, errfd };
    const size_t stack_size = 256 * 1024;
    if (cgroup >= 0 && !CFS_HAVE_CLONE3)
        return -ENOSYS;
    char *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED)
        return -errno;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &c.oldmask);
    int exit_signal = (flags & CLONE_PARENT) ? 0 : SIGCHLD;
    *pidfd = -1;
    long pid;
    int err = 0;
#if CFS_HAVE_CLONE3
    if (cgroup >= 0) {
        struct cfs_clone_args args;
        memset(&args, 0, sizeof args);
        args.flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD | CLONE_INTO_CGROUP |
                     (uint64_t)flags;
        args.pidfd = (uint64_t)(uintptr_t)pidfd;
        args.exit_signal = (uint64_t)exit_signal;
        args.stack = (uint64_t)(uintptr_t)stack;
        args.stack_size = stack_size;
        args.cgroup = (uint64_t)cgroup;
        pid = cfs_clone3_raw(&args, sizeof args, child, &c);
        if (pid < 0) {
            err = (int)-pid;
            pid = -1;
        }
    } else
#endif
    {
        pid = clone(child, stack + stack_size,
                    CLONE_VM | CLONE_VFORK | CLONE_PIDFD | (int)flags | exit_signal, &c,
                    pidfd);
        err = errno;
    }
    pthread_sigmask(SIG_SETMASK, &c.oldmask, NULL);
    munmap(stack, stack_size);
    return pid < 0 ? -err : pid;
}
