/*
 * pingpong: latency and bandwidth between ranks 0 and 1 (other ranks idle).
 *
 *   pingpong [ITERS]   ITERS round trips per size after 10 % warm-up, default 1000 for 8 B and
 *                      ITERS/10 (at least 10) for the large sizes.
 *
 * Rank 0 prints one line per size:
 *   "pingpong: bytes=8 iters=1000 latency_us=1.23 bandwidth_MBps=6.5"
 * where latency is half the round trip and bandwidth is bytes / latency. Every received buffer's
 * first and last byte are checked.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    int rank, size;
    long iters = argc > 1 ? strtol(argv[1], NULL, 10) : 1000;
    const long sizes[] = {8, 1 << 20, 4 << 20};

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size < 2 || iters < 1) {
        if (rank == 0)
            fprintf(stderr, "pingpong: FAIL needs at least 2 ranks and ITERS >= 1\n");
        MPI_Finalize();
        return 1;
    }
    unsigned char *buf = malloc(4 << 20);
    if (buf == NULL) {
        fprintf(stderr, "pingpong: FAIL cannot allocate\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        long bytes = sizes[s];
        long n = bytes == 8 ? iters : (iters / 10 < 10 ? 10 : iters / 10);
        long warm = n / 10 + 1;
        double start = 0;
        for (long i = 0; i < warm + n; i++) {
            if (i == warm) {
                MPI_Barrier(MPI_COMM_WORLD);
                start = MPI_Wtime();
            }
            if (rank == 0) {
                buf[0] = buf[bytes - 1] = (unsigned char)i;
                MPI_Send(buf, (int)bytes, MPI_BYTE, 1, 1, MPI_COMM_WORLD);
                MPI_Recv(buf, (int)bytes, MPI_BYTE, 1, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                if (buf[0] != (unsigned char)(i + 1) || buf[bytes - 1] != (unsigned char)(i + 1)) {
                    fprintf(stderr, "pingpong: FAIL bytes=%ld iteration %ld: wrong reply\n", bytes, i);
                    MPI_Abort(MPI_COMM_WORLD, 1);
                }
            } else if (rank == 1) {
                MPI_Recv(buf, (int)bytes, MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                buf[0] = buf[bytes - 1] = (unsigned char)(buf[0] + 1);
                MPI_Send(buf, (int)bytes, MPI_BYTE, 0, 2, MPI_COMM_WORLD);
            }
        }
        double elapsed = MPI_Wtime() - start;
        if (rank == 0) {
            double lat = elapsed / (2.0 * (double)n);
            printf("pingpong: bytes=%ld iters=%ld latency_us=%.2f bandwidth_MBps=%.1f\n", bytes, n,
                   lat * 1e6, (double)bytes / lat / 1e6);
            fflush(stdout);
        }
        MPI_Barrier(MPI_COMM_WORLD);
    }
    free(buf);
    MPI_Finalize();
    return 0;
}
