/*
 * abort: one rank fails while the others wait, to test how a launcher ends a broken job.
 *
 *   abort [abort [CODE]]    the failing rank calls MPI_Abort(MPI_COMM_WORLD, CODE), CODE = 7
 *   abort exit [CODE]       the failing rank calls exit(CODE) without MPI_Finalize, CODE = 3
 *   abort signal [SIGNUM]   the failing rank raises SIGNUM, SIGNUM = 9 (SIGKILL)
 *
 * The failing rank is rank 1 (rank 0 when the job has one rank). The other ranks block in
 * MPI_Barrier forever, so the job only ends if the launcher tears it down.
 */
#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(void)
{
    fprintf(stderr, "usage: abort [abort [CODE] | exit [CODE] | signal [SIGNUM]]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int rank, size;
    const char *mode = argc > 1 ? argv[1] : "abort";
    int value;

    if (strcmp(mode, "abort") == 0)
        value = 7;
    else if (strcmp(mode, "exit") == 0)
        value = 3;
    else if (strcmp(mode, "signal") == 0)
        value = SIGKILL;
    else
        usage();
    if (argc > 2) {
        char *end;
        long v = strtol(argv[2], &end, 10);
        if (*end != '\0' || v < 0 || v > 255)
            usage();
        value = (int)v;
    }

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int victim = size > 1 ? 1 : 0;
    printf("abort: rank=%d size=%d pid=%d started\n", rank, size, (int)getpid());
    fflush(stdout);

    if (rank == victim) {
        /* Let the other ranks reach the barrier first, so the failure hits a running job. */
        usleep(200000);
        if (strcmp(mode, "abort") == 0) {
            printf("abort: rank=%d calling MPI_Abort(MPI_COMM_WORLD, %d)\n", rank, value);
            fflush(stdout);
            MPI_Abort(MPI_COMM_WORLD, value);
        } else if (strcmp(mode, "exit") == 0) {
            printf("abort: rank=%d calling exit(%d)\n", rank, value);
            fflush(stdout);
            exit(value);
        } else {
            printf("abort: rank=%d raising signal %d\n", rank, value);
            fflush(stdout);
            raise(value);
        }
        /* A signal that does not kill (or a masked one) must not look like success. */
        fprintf(stderr, "abort: rank=%d still alive after %s %d\n", rank, mode, value);
        return 99;
    }
    MPI_Barrier(MPI_COMM_WORLD);
    fprintf(stderr, "abort: rank=%d passed the barrier, which must never happen\n", rank);
    MPI_Finalize();
    return 98;
}
