/* MPI name service through PMI: rank 0 publishes a port name, every rank looks it up after a
 * barrier, rank 0 unpublishes it. Prints "names OK <port>". */
#include <mpi.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    int rank;
    char port[MPI_MAX_PORT_NAME] = "cmpirun-test-port-42", found[MPI_MAX_PORT_NAME] = "";
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 0 && MPI_Publish_name("cmpirun-svc", MPI_INFO_NULL, port) != MPI_SUCCESS)
        return 1;
    MPI_Barrier(MPI_COMM_WORLD);
    if (MPI_Lookup_name("cmpirun-svc", MPI_INFO_NULL, found) != MPI_SUCCESS)
        return 2;
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0 && MPI_Unpublish_name("cmpirun-svc", MPI_INFO_NULL, port) != MPI_SUCCESS)
        return 3;
    MPI_Finalize();
    if (strcmp(found, port) != 0) {
        fprintf(stderr, "rank %d: looked up %s\n", rank, found);
        return 4;
    }
    printf("names OK %s\n", found);
    return 0;
}
