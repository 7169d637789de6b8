/* A PMI-1 client that speaks the wire protocol directly over PMI_FD (no MPI, no PMI
 * library): init, get_maxes, get_my_kvsname, NPUTS puts, a barrier, a get of every other
 * rank's key 0, finalize. Used by the fence benchmark under both cmpirun's server and hydra. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NPUTS 4
static int fd;
static char line[4096];

static void sendline(const char *s)
{
    size_t n = strlen(s), off = 0;
    while (off < n) {
        ssize_t w = write(fd, s + off, n - off);
        if (w <= 0) { perror("write"); exit(2); }
        off += (size_t) w;
    }
}

static const char *readline_expect(const char *cmd)
{
    size_t n = 0;
    while (n < sizeof(line) - 1) {
        ssize_t r = read(fd, line + n, 1);
        if (r <= 0) { fprintf(stderr, "read: connection closed\n"); exit(2); }
        if (line[n++] == '\n') break;
    }
    line[n] = 0;
    if (strncmp(line, "cmd=", 4) != 0 || strncmp(line + 4, cmd, strlen(cmd)) != 0) {
        fprintf(stderr, "expected cmd=%s, got %s", cmd, line);
        exit(2);
    }
    return line;
}

static const char *val(const char *l, const char *key, char *out, size_t len)
{
    char pat[64];
    snprintf(pat, sizeof(pat), " %s=", key);
    const char *p = strstr(l, pat);
    if (!p) { fprintf(stderr, "no %s in %s", key, l); exit(2); }
    p += strlen(pat);
    size_t i = 0;
    while (p[i] && p[i] != ' ' && p[i] != '\n' && i < len - 1) { out[i] = p[i]; i++; }
    out[i] = 0;
    return out;
}

int main(void)
{
    const char *e = getenv("PMI_FD");
    if (!e) { fprintf(stderr, "PMI_FD is not set\n"); return 2; }
    fd = atoi(e);
    int rank = atoi(getenv("PMI_RANK") ? getenv("PMI_RANK") : "0");
    int size = atoi(getenv("PMI_SIZE") ? getenv("PMI_SIZE") : "1");
    char kvs[256], buf[4096], v[1024], want[256];

    sendline("cmd=init pmi_version=1 pmi_subversion=1\n");
    readline_expect("response_to_init");
    sendline("cmd=get_maxes\n");
    readline_expect("maxes");
    sendline("cmd=get_my_kvsname\n");
    val(readline_expect("my_kvsname"), "kvsname", kvs, sizeof(kvs));
    for (int i = 0; i < NPUTS; i++) {
        snprintf(buf, sizeof(buf), "cmd=put kvsname=%s key=r%d-k%d value=v%d-%d\n", kvs, rank, i, rank, i);
        sendline(buf);
        readline_expect("put_result");
    }
    sendline("cmd=barrier_in\n");
    readline_expect("barrier_out");
    for (int r = 0; r < size; r++) {
        if (r == rank) continue;
        snprintf(buf, sizeof(buf), "cmd=get kvsname=%s key=r%d-k0\n", kvs, r);
        sendline(buf);
        val(readline_expect("get_result"), "value", v, sizeof(v));
        snprintf(want, sizeof(want), "v%d-0", r);
        if (strcmp(v, want) != 0) { fprintf(stderr, "rank %d: r%d-k0=%s\n", rank, r, v); return 1; }
    }
    sendline("cmd=finalize\n");
    readline_expect("finalize_ack");
    return 0;
}
