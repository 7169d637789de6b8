/*
 * mpitest: the end-to-end check of an MPI job.
 *
 *   1. hello: every rank prints rank/size/host, its uid and the inodes of its user and mount
 *      namespaces, so a test can check that all ranks of a node share one container;
 *   2. a token ring: the token goes round once and each rank adds its rank number;
 *   3. an allreduce whose sum is checked against the closed form.
 *
 * With MPITEST_FABRIC=1 each rank also reports which libfabric*.so it has mapped (path, st_dev,
 * st_ino) and the fi_version() of that very file, which shows whether a host library was injected.
 *
 * Output lines are "key=value" so tests can parse them; rank 0 ends with "mpitest: OK size=N".
 * Any failed check prints "mpitest: FAIL ..." and exits 1.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int rank, size;

static void fail(const char *what)
{
    fprintf(stderr, "mpitest: FAIL rank=%d %s\n", rank, what);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

static unsigned long ns_inode(const char *which)
{
    char path[64];
    struct stat st;
    snprintf(path, sizeof path, "/proc/self/ns/%s", which);
    if (stat(path, &st) != 0)
        return 0;
    return (unsigned long)st.st_ino;
}

struct fabric_seen {
    int count;
};

static int report_fabric(struct dl_phdr_info *info, size_t len, void *data)
{
    struct fabric_seen *seen = data;
    const char *name = info->dlpi_name;
    const char *base;
    struct stat st;
    (void)len;
    if (name == NULL || name[0] == '\0')
        return 0;
    base = strrchr(name, '/');
    base = base ? base + 1 : name;
    if (strncmp(base, "libfabric", 9) != 0 || strstr(base, ".so") == NULL)
        return 0;
    seen->count++;
    unsigned long dev = 0, ino = 0;
    if (stat(name, &st) == 0) {
        dev = (unsigned long)st.st_dev;
        ino = (unsigned long)st.st_ino;
    }
    /* RTLD_NOLOAD: look the symbol up in the copy already mapped, never load another one. */
    char version[32] = "unknown";
    void *handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
    if (handle != NULL) {
        uint32_t (*fi_version)(void) = (uint32_t(*)(void))dlsym(handle, "fi_version");
        if (fi_version != NULL) {
            uint32_t v = fi_version();
            snprintf(version, sizeof version, "%u.%u", v >> 16, v & 0xffff);
        }
        dlclose(handle);
    }
    printf("fabric: rank=%d path=%s dev=%lu ino=%lu fi_version=%s\n", rank, name, dev, ino, version);
    return 0;
}

int main(int argc, char **argv)
{
    char host[256] = "?";
    int token, sum, expected;
    MPI_Status status;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host - 1);

    if (rank == 0) {
        char lib[MPI_MAX_LIBRARY_VERSION_STRING];
        int len = 0;
        MPI_Get_library_version(lib, &len);
        char *nl = strchr(lib, '\n');
        if (nl)
            *nl = '\0';
        printf("library: %s\n", lib);
    }
    printf("hello: rank=%d size=%d host=%s uid=%u gid=%u userns=%lu mntns=%lu pid=%d\n", rank, size,
           host, (unsigned)getuid(), (unsigned)getgid(), ns_inode("user"), ns_inode("mnt"),
           (int)getpid());
    fflush(stdout);

    /* Token ring: rank 0 starts with 0, every rank adds its own rank and passes it on. */
    if (size > 1) {
        int next = (rank + 1) % size, prev = (rank + size - 1) % size;
        if (rank == 0) {
            token = 0;
            MPI_Send(&token, 1, MPI_INT, next, 42, MPI_COMM_WORLD);
            MPI_Recv(&token, 1, MPI_INT, prev, 42, MPI_COMM_WORLD, &status);
            expected = size * (size - 1) / 2;
            if (token != expected) {
                char msg[96];
                snprintf(msg, sizeof msg, "ring token=%d expected=%d", token, expected);
                fail(msg);
            }
            printf("ring: OK token=%d\n", token);
        } else {
            MPI_Recv(&token, 1, MPI_INT, prev, 42, MPI_COMM_WORLD, &status);
            token += rank;
            MPI_Send(&token, 1, MPI_INT, next, 42, MPI_COMM_WORLD);
        }
    } else {
        printf("ring: OK token=0\n");
    }

    /* Allreduce of rank+1 over all ranks must equal size*(size+1)/2 on every rank. */
    int mine = rank + 1;
    MPI_Allreduce(&mine, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    expected = size * (size + 1) / 2;
    if (sum != expected) {
        char msg[96];
        snprintf(msg, sizeof msg, "allreduce sum=%d expected=%d", sum, expected);
        fail(msg);
    }
    if (rank == 0)
        printf("allreduce: OK sum=%d\n", sum);

    const char *fab = getenv("MPITEST_FABRIC");
    if (fab != NULL && strcmp(fab, "1") == 0) {
        struct fabric_seen seen = {0};
        dl_iterate_phdr(report_fabric, &seen);
        if (seen.count == 0)
            printf("fabric: rank=%d path=none\n", rank);
    }
    fflush(stdout);

    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) {
        printf("mpitest: OK size=%d\n", size);
        fflush(stdout);
    }
    MPI_Finalize();
    return 0;
}
