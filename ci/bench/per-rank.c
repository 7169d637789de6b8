/*
 * per-rank: the per-rank container model that `ci/bench.sh` compares cmpirun against, i.e. what
 * `srun apptainer exec IMAGE PROG` does for every rank: each rank gets its own user namespace,
 * its own mount namespace and its own squashfuse_ll server.
 *
 *   per-rank IMAGE OFFSET PROG [ARGS...]
 *
 * Steps (the fastest way to do them, so the model is not handicapped by shell start-up):
 *   1. unshare(CLONE_NEWUSER|CLONE_NEWNS), setgroups=deny, identity uid/gid maps;
 *   2. / made recursively private, a tmpfs on /mnt holding the mount point;
 *   3. open /dev/fuse and mount(2) it there (fd=N), while the namespace's capabilities are held;
 *   4. fork squashfuse_ll -f -o offset=OFFSET /dev/fd/IMG /dev/fd/FUSE (parent-death SIGKILL);
 *   5. wait for the image to answer, rbind /proc /sys /dev and bind /tmp into it;
 *   6. pivot_root into the image, detach the old root, exec PROG in this process.
 * When PROG exits, its parent-death signal kills squashfuse_ll and the namespaces go away.
 *
 * Ranks in sibling user namespaces cannot use UCX's /proc/<pid>/fd and CMA single-copy paths, so
 * MPICH/UCX ranks need UCX_POSIX_USE_PROC_LINK=n UCX_TLS=^cma (set by the caller).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static void die(const char *what)
{
    fprintf(stderr, "per-rank: %s: %s\n", what, strerror(errno));
    exit(125);
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        die(path);
    close(fd);
}

static void bind(const char *src, const char *dst, unsigned long extra)
{
    if (mount(src, dst, NULL, MS_BIND | extra, NULL) != 0)
        die(dst);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: per-rank IMAGE OFFSET PROG [ARGS...]\n");
        return 2;
    }
    const char *image = argv[1], *offset = argv[2];
    uid_t uid = getuid();
    gid_t gid = getgid();
    char buf[256];

    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0)
        die("unshare");
    write_file("/proc/self/setgroups", "deny");
    snprintf(buf, sizeof buf, "%u %u 1", uid, uid);
    write_file("/proc/self/uid_map", buf);
    snprintf(buf, sizeof buf, "%u %u 1", gid, gid);
    write_file("/proc/self/gid_map", buf);
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        die("make / private");
    if (mount("tmpfs", "/mnt", "tmpfs", 0, "mode=0755") != 0)
        die("tmpfs on /mnt");
    if (mkdir("/mnt/root", 0755) != 0)
        die("mkdir /mnt/root");

    int img = open(image, O_RDONLY); /* inherited by squashfuse_ll */
    if (img < 0)
        die(image);
    int fuse = open("/dev/fuse", O_RDWR);
    if (fuse < 0)
        die("/dev/fuse");
    snprintf(buf, sizeof buf, "fd=%d,rootmode=40000,user_id=%u,group_id=%u,default_permissions", fuse,
             uid, gid);
    if (mount("squashfuse", "/mnt/root", "fuse.squashfuse", MS_NOSUID | MS_NODEV | MS_RDONLY, buf) != 0)
        die("mount fuse");

    pid_t server = fork();
    if (server < 0)
        die("fork");
    if (server == 0) {
        char opt[64], img_path[32], fuse_path[32];
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        /* Only stdio, the image and the FUSE fd: no PMI socket or MPI pipe of the rank. */
        for (int fd = 3; fd < 1024; fd++)
            if (fd != img && fd != fuse)
                close(fd);
        snprintf(opt, sizeof opt, "offset=%s", offset);
        snprintf(img_path, sizeof img_path, "/dev/fd/%d", img);
        snprintf(fuse_path, sizeof fuse_path, "/dev/fd/%d", fuse);
        execlp("squashfuse_ll", "squashfuse_ll", "-f", "-o", opt, img_path, fuse_path, (char *)NULL);
        _exit(127);
    }
    close(fuse);
    close(img);

    /* The first lookup blocks until the server has answered FUSE_INIT. */
    struct stat st;
    if (stat("/mnt/root/usr", &st) != 0)
        die("image not served (/mnt/root/usr)");
    bind("/proc", "/mnt/root/proc", MS_REC);
    bind("/sys", "/mnt/root/sys", MS_REC);
    bind("/dev", "/mnt/root/dev", MS_REC);
    bind("/tmp", "/mnt/root/tmp", 0);
    if (chdir("/mnt/root") != 0)
        die("chdir");
    if (syscall(SYS_pivot_root, ".", ".") != 0)
        die("pivot_root");
    if (umount2(".", MNT_DETACH) != 0)
        die("detach old root");
    if (chdir("/") != 0)
        die("chdir /");
    execvp(argv[3], argv + 3);
    die(argv[3]);
}
