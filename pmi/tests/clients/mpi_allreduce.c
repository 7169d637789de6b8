/* MPI wire-up check: MPI_Init (PMI put/fence/get rounds), an allgather and an allreduce,
 * MPI_Finalize; prints "OK rank/size appnum=N". With the argument "abort", rank 0 calls MPI_Abort(MPI_COMM_WORLD, 7) after
 * MPI_Init while the other ranks wait in a barrier. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);

    if (argc > 1 && strcmp(argv[1], "abort") == 0) {
        if (rank == 0)
            MPI_Abort(MPI_COMM_WORLD, 7);
        MPI_Barrier(MPI_COMM_WORLD);
    }

    int *all = malloc(sizeof(int) * size);
    MPI_Allgather(&rank, 1, MPI_INT, all, 1, MPI_INT, MPI_COMM_WORLD);
    for (int i = 0; i < size; i++) {
        if (all[i] != i) {
            fprintf(stderr, "rank %d: allgather slot %d holds %d\n", rank, i, all[i]);
            return 1;
        }
    }
    long sum = 0, mine = rank + 1;
    MPI_Allreduce(&mine, &sum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    if (sum != (long) size * (size + 1) / 2) {
        fprintf(stderr, "rank %d: allreduce gave %ld\n", rank, sum);
        return 1;
    }
    free(all);
    /* MPMD: the application number comes from the process manager (PMI get_appnum). */
    int *appnum = NULL, flag = 0;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_APPNUM, &appnum, &flag);
    MPI_Finalize();
    printf("OK %d/%d appnum=%d\n", rank, size, flag ? *appnum : -1);
    return 0;
}
