/*
 * bigmsg: 16 MiB messages, which take MPI's rendezvous and single-copy (CMA) paths.
 *
 *   1. rank 0 broadcasts 16 MiB filled with a known pattern; every rank checks every byte;
 *   2. every rank sends 16 MiB to its right neighbour and receives from its left one
 *      (MPI_Sendrecv), each buffer patterned by its sender; the receiver checks every byte.
 *
 * Rank 0 ends with "bigmsg: OK size=N bytes=16777216"; a mismatch prints "bigmsg: FAIL" and exits 1.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BYTES (16 * 1024 * 1024)

static int rank, size;

static unsigned char pattern(int sender, size_t i)
{
    return (unsigned char)((i * 131u + (size_t)sender * 17u + (i >> 12)) & 0xff);
}

static void fill(unsigned char *buf, int sender)
{
    for (size_t i = 0; i < BYTES; i++)
        buf[i] = pattern(sender, i);
}

static void check(const unsigned char *buf, int sender, const char *what)
{
    for (size_t i = 0; i < BYTES; i++) {
        if (buf[i] != pattern(sender, i)) {
            fprintf(stderr, "bigmsg: FAIL rank=%d %s from=%d offset=%zu got=%u want=%u\n", rank, what,
                    sender, i, buf[i], pattern(sender, i));
            fflush(stderr);
            MPI_Abort(MPI_COMM_WORLD, 1);
            exit(1);
        }
    }
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);

    unsigned char *a = malloc(BYTES), *b = malloc(BYTES);
    if (a == NULL || b == NULL) {
        fprintf(stderr, "bigmsg: FAIL rank=%d cannot allocate 2 x %d bytes\n", rank, BYTES);
        MPI_Abort(MPI_COMM_WORLD, 1);
        return 1;
    }

    if (rank == 0)
        fill(a, 0);
    else
        memset(a, 0, BYTES);
    MPI_Bcast(a, BYTES, MPI_BYTE, 0, MPI_COMM_WORLD);
    check(a, 0, "bcast");
    if (rank == 0)
        printf("bcast: OK bytes=%d\n", BYTES);

    int right = (rank + 1) % size, left = (rank + size - 1) % size;
    fill(a, rank);
    memset(b, 0, BYTES);
    MPI_Sendrecv(a, BYTES, MPI_BYTE, right, 7, b, BYTES, MPI_BYTE, left, 7, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);
    check(b, left, "sendrecv");
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) {
        printf("sendrecv: OK bytes=%d\n", BYTES);
        printf("bigmsg: OK size=%d bytes=%d\n", size, BYTES);
        fflush(stdout);
    }
    free(a);
    free(b);
    MPI_Finalize();
    return 0;
}
