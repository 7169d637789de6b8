/* CMA probe for the container tests: does process_vm_readv work between two processes?
 *
 *   cma serve FILE   write "PID ADDRESS LENGTH" of a secret to FILE, then wait until FILE.stop exists
 *   cma read PID ADDRESS LENGTH   read that many bytes from PID; print "read: <bytes>" or
 *                                 "error: <errno name>" and exit 0 / 3
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

static char secret[] = "cma-secret-0123456789";

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "serve") == 0) {
        char tmp[4096], stop[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", argv[2]);
        snprintf(stop, sizeof stop, "%s.stop", argv[2]);
        FILE *f = fopen(tmp, "w");
        if (!f) { perror(tmp); return 1; }
        fprintf(f, "%d %lu %zu\n", (int)getpid(), (unsigned long)secret, strlen(secret));
        fclose(f);
        if (rename(tmp, argv[2]) != 0) { perror(argv[2]); return 1; }
        for (int i = 0; i < 600 && access(stop, F_OK) != 0; i++) usleep(100000);
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "read") == 0) {
        pid_t pid = (pid_t)atoi(argv[2]);
        unsigned long addr = strtoul(argv[3], NULL, 10);
        size_t len = (size_t)strtoul(argv[4], NULL, 10);
        char buf[256] = {0};
        if (len >= sizeof buf) return 2;
        struct iovec local = {buf, len}, remote = {(void *)addr, len};
        ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (n < 0) { printf("error: %s\n", strerrorname_np(errno)); return 3; }
        printf("read: %.*s\n", (int)n, buf);
        return 0;
    }
    fprintf(stderr, "usage: cma serve FILE | cma read PID ADDRESS LENGTH\n");
    return 2;
}
